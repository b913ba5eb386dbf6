#include "manifest_checks.hpp"

#include <algorithm>
#include <filesystem>
#include <initializer_list>
#include <stdexcept>
#include <utility>
#include <vector>

#include "engine.hpp"
#include "safetensors.hpp"

namespace dsv3 {
namespace {

// reference/args.py: MAX_SEQ_LEN, MAX_BATCH_SIZE. Sizes ModelArgs does not bound above are kept below
// 2^40 here, far above any model, so that the runtime's sums and products of them cannot overflow.
constexpr int64_t kMaxSeqLen = int64_t{1} << 20;
constexpr int64_t kMaxBatchSize = 4096;
constexpr int64_t kMaxSize = int64_t{1} << 40;
// The cache dtypes dsv3-run allocates (engine.cpp dtype_from_name).
const std::vector<std::string> kCacheDtypes = {"float32", "bfloat16", "float16"};

std::string quoted_list(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", '" : "'") + names[i] + "'";
  return out + "]";
}

// Typed reads of manifest values; each failure an EngineError "<source>: '<key>' <why>, got <value>".
class Checks {
 public:
  explicit Checks(std::string source) : source_(std::move(source)) {}

  [[noreturn]] void bad(const std::string& key, const std::string& why) const {
    throw EngineError(source_ + ": '" + key + "' " + why);
  }

  // Every name present in obj (the value at key; "" for the manifest itself), else all missing ones named.
  void require(const Json& obj, const std::string& key, std::initializer_list<const char*> names) const {
    std::vector<std::string> missing;
    for (const char* name : names)
      if (obj.find(name) == nullptr) missing.emplace_back(name);
    if (missing.empty()) return;
    if (key.empty()) throw EngineError(source_ + ": manifest lacks key(s) " + quoted_list(missing));
    bad(key, "lacks key(s) " + quoted_list(missing));
  }

  const std::vector<std::pair<std::string, Json>>& object(const Json& v, const std::string& key) const {
    if (!v.is_object()) bad(key, "must be an object, got " + v.dump());
    return v.as_object(key);
  }

  const std::vector<Json>& list(const Json& v, const std::string& key) const {
    if (!v.is_array()) bad(key, "must be a list, got " + v.dump());
    return v.as_array(key);
  }

  const std::string& text(const Json& v, const std::string& key) const {
    if (!v.is_string()) bad(key, "must be a string, got " + v.dump());
    return v.as_string(key);
  }

  // An integer literal (not 2.0, not true) in [lo, hi].
  int64_t integer(const Json& v, const std::string& key, int64_t lo, int64_t hi = kMaxSize) const {
    if (!v.is_number()) bad(key, "must be an integer, got " + v.dump());
    int64_t n = 0;
    try {
      n = v.as_int(key);
    } catch (const std::runtime_error&) {
      const bool integral = v.dump().find_first_of(".eE") == std::string::npos;
      bad(key, std::string(integral ? "must be a 64-bit integer" : "must be an integer") + ", got " + v.dump());
    }
    if (n < lo) bad(key, "must be >= " + std::to_string(lo) + ", got " + std::to_string(n));
    if (n > hi) bad(key, "must be <= " + std::to_string(hi) + ", got " + std::to_string(n));
    return n;
  }

  // An optional key: absent or null, else a string.
  void optional_text(const Json& obj, const std::string& key, const std::string& name) const {
    const Json* v = obj.find(name);
    if (v != nullptr && !v->is_null() && !v->is_string())
      bad(key + "." + name, "must be a string or null, got " + v->dump());
  }

 private:
  std::string source_;
};

bool is_sha256_hex(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// name -> {size: int >= 0, sha256: 64 lowercase hex digits}, exactly those keys.
void check_files(const Checks& c, const Json& files) {
  for (const auto& [name, entry] : c.object(files, "files")) {
    const std::string key = "files." + name;
    std::vector<std::string> keys;
    for (const auto& kv : c.object(entry, key)) keys.push_back(kv.first);
    std::sort(keys.begin(), keys.end());
    if (keys != std::vector<std::string>{"sha256", "size"})
      c.bad(key, "must have exactly the keys ['sha256', 'size'], got " + quoted_list(keys));
    c.integer(entry.at("size", key), key + ".size", 0, INT64_MAX);
    const Json& sha = entry.at("sha256", key);
    if (!sha.is_string() || !is_sha256_hex(sha.as_string(key)))
      c.bad(key + ".sha256", "must be 64 lowercase hex digits, got " + sha.dump());
  }
}

// A payload file the runtime opens: a string naming a file that 'files' lists (and so verifies).
void check_listed(const Checks& c, const Json& v, const std::string& key, const Json& files) {
  const std::string& name = c.text(v, key);
  if (files.find(name) == nullptr) c.bad(key, "names \"" + name + "\", which 'files' does not list");
}

// backend_info.constants.<fqn>: {dtype, shape, stride (list or null), device}, as engines/torch_step.py
// constant_records writes them; engine.cpp compares each with the weights file's tensor.
void check_constant_record(const Checks& c, const Json& record, const std::string& key) {
  c.object(record, key);
  c.require(record, key, {"dtype", "shape"});
  c.text(record.at("dtype", key), key + ".dtype");
  for (const Json& n : c.list(record.at("shape", key), key + ".shape")) c.integer(n, key + ".shape", 0);
  const Json* stride = record.find("stride");
  if (stride != nullptr && !stride->is_null())
    for (const Json& n : c.list(*stride, key + ".stride")) c.integer(n, key + ".stride", 0);
  c.optional_text(record, key, "device");
}

// The device record (engines/torch_device.py device_info), the layout, the files it names, the constants.
void check_backend_info(const Checks& c, const Json& info, const Json& files) {
  c.object(info, "backend_info");
  c.require(info, "backend_info", {"layout", "device_kind", "weights", "packages"});
  const std::string& layout = c.text(info.at("layout", "backend_info"), "backend_info.layout");
  if (layout != kPayloadLayout)
    c.bad("backend_info.layout", "is \"" + layout + "\", this runtime reads \"" + kPayloadLayout + "\"");
  const std::string& kind = c.text(info.at("device_kind", "backend_info"), "backend_info.device_kind");
  if (kind == "cpu") {
    c.require(info, "backend_info", {"cpu_flags_required"});
    for (const Json& flag : c.list(info.at("cpu_flags_required", ""), "backend_info.cpu_flags_required"))
      c.text(flag, "backend_info.cpu_flags_required");
  } else if (kind == "cuda") {
    c.require(info, "backend_info", {"compute_capability"});
    c.text(info.at("compute_capability", ""), "backend_info.compute_capability");
  } else {
    c.bad("backend_info.device_kind", "must be \"cpu\" or \"cuda\", got \"" + kind + "\"");
  }
  c.optional_text(info, "backend_info", "machine");
  c.optional_text(info, "backend_info", "cpu_isa");
  check_listed(c, info.at("weights", ""), "backend_info.weights", files);
  const Json& packages = info.at("packages", "");
  c.object(packages, "backend_info.packages");
  c.require(packages, "backend_info.packages", {"prefill", "decode"});
  check_listed(c, packages.at("prefill", ""), "backend_info.packages.prefill", files);
  check_listed(c, packages.at("decode", ""), "backend_info.packages.decode", files);
  const Json* constants = info.find("constants");  // absent or null: an engine from before the build recorded them
  if (constants != nullptr && !constants->is_null())
    for (const auto& [fqn, record] : c.object(*constants, "backend_info.constants"))
      check_constant_record(c, record, "backend_info.constants." + fqn);
}

// The sizes dsv3-run reads, in ModelArgs' ranges (reference/args.py _AT_LEAST, _AT_MOST, qk_rope_head_dim even).
ModelSizes check_model(const Checks& c, const Json& model) {
  c.object(model, "model");
  c.require(model, "model",
            {"vocab_size", "n_layers", "max_batch_size", "max_seq_len", "kv_lora_rank", "qk_rope_head_dim"});
  ModelSizes m;
  m.vocab_size = c.integer(model.at("vocab_size", ""), "model.vocab_size", 1);
  m.n_layers = c.integer(model.at("n_layers", ""), "model.n_layers", 1);
  m.max_batch_size = c.integer(model.at("max_batch_size", ""), "model.max_batch_size", 1, kMaxBatchSize);
  m.max_seq_len = c.integer(model.at("max_seq_len", ""), "model.max_seq_len", 1, kMaxSeqLen);
  m.kv_lora_rank = c.integer(model.at("kv_lora_rank", ""), "model.kv_lora_rank", 1);
  m.qk_rope_head_dim = c.integer(model.at("qk_rope_head_dim", ""), "model.qk_rope_head_dim", 2);
  if (m.qk_rope_head_dim % 2 != 0)
    c.bad("model.qk_rope_head_dim", "must be even, got " + std::to_string(m.qk_rope_head_dim));
  return m;
}

// Each entry a TensorSpec.to_dict(): name and dtype strings, shape a list of sizes >= 0 or symbolic names.
void check_specs(const Checks& c, const Json& specs, const std::string& key) {
  const auto& items = c.list(specs, key);
  for (size_t i = 0; i < items.size(); ++i) {
    const std::string at = key + "[" + std::to_string(i) + "]";
    c.object(items[i], at);
    c.require(items[i], at, {"name", "dtype", "shape"});
    c.text(items[i].at("name", at), at + ".name");
    c.text(items[i].at("dtype", at), at + ".dtype");
    for (const Json& n : c.list(items[i].at("shape", at), at + ".shape"))
      if (!n.is_string()) c.integer(n, at + ".shape", 0);
  }
}

// v is the integer want (an integer literal: 80.0 and "80" are not 80).
bool is_integer(const Json& v, int64_t want) {
  if (!v.is_number()) return false;
  try {
    return v.as_int("") == want;
  } catch (const std::runtime_error&) {
    return false;
  }
}

// The first spec of that name, or nullptr.
const Json* spec_named(const Json& specs, const std::string& name) {
  for (const Json& s : specs.as_array(name))
    if (s.at("name", name).as_string(name) == name) return &s;
  return nullptr;
}

// The logits output's last dimension is the vocabulary: dsv3-run bounds token ids by model.vocab_size.
void check_logits(const Checks& c, const Json& outputs, const ModelSizes& m) {
  const Json* logits = spec_named(outputs, "logits");
  if (logits == nullptr || logits->at("shape", "").as_array("").empty())
    c.bad("outputs", "has no 'logits' output with a shape");
  const Json& width = logits->at("shape", "").as_array("").back();
  if (!is_integer(width, m.vocab_size))
    c.bad("model.vocab_size", "is " + std::to_string(m.vocab_size) + " but the 'logits' output's last dimension is " +
                                  width.dump());
}

// kv_cache_layout's shape [batch, n_layers, cache_len, latent width] and dtype against the model, and the
// dtype the packages take their 'kv_cache' input in (the cache dsv3-run allocates and hands them).
void check_kv_cache(const Checks& c, const Json& kv, const Json& inputs, const ModelSizes& m) {
  c.object(kv, "kv_cache");
  c.require(kv, "kv_cache", {"shape", "dtype"});
  const Json& shape = kv.at("shape", "");
  if (!shape.is_array() || shape.as_array("").size() != 4)
    c.bad("kv_cache.shape", "must be a list of 4 dimensions, got " + shape.dump());
  const Json& layers = shape.as_array("")[1];
  if (!is_integer(layers, m.n_layers))
    c.bad("kv_cache.shape", "layers " + layers.dump() + " differ from model.n_layers=" + std::to_string(m.n_layers));
  const Json& width = shape.as_array("")[3];
  if (!is_integer(width, m.cache_width()))
    c.bad("kv_cache.shape", "width " + width.dump() + " differs from the model's latent cache width " +
                                std::to_string(m.cache_width()) + " (kv_lora_rank + qk_rope_head_dim)");
  const std::string& dtype = c.text(kv.at("dtype", ""), "kv_cache.dtype");
  if (std::find(kCacheDtypes.begin(), kCacheDtypes.end(), dtype) == kCacheDtypes.end())
    c.bad("kv_cache.dtype", "is \"" + dtype + "\", not one of " + quoted_list(kCacheDtypes));
  const Json* input = spec_named(inputs, "kv_cache");
  if (input == nullptr) c.bad("inputs", "has no 'kv_cache' input");
  const std::string& taken = input->at("dtype", "").as_string("");
  if (taken != dtype)
    c.bad("kv_cache.dtype", "is \"" + dtype + "\" but the packages' 'kv_cache' input is \"" + taken + "\"");
}

}  // namespace

void check_format_version(const Json& manifest, const std::string& source) {
  if (!manifest.is_object()) throw EngineError(source + ": expected a JSON object");
  const Checks c(source);
  c.require(manifest, "", {"format_version"});
  const Json& v = manifest.at("format_version", "");
  const int64_t version = c.integer(v, "format_version", INT64_MIN, INT64_MAX);
  if (version > kFormatVersion)
    throw EngineError(source + ": format version " + std::to_string(version) +
                      " is newer than this runtime reads (<= " + std::to_string(kFormatVersion) + ")");
  c.integer(v, "format_version", 1, kFormatVersion);
}

ModelSizes check_manifest(const Json& manifest, const std::string& source) {
  const Checks c(source);
  c.require(manifest, "", {"backend", "files", "backend_info", "model", "kv_cache", "inputs", "outputs"});
  const std::string& backend = c.text(manifest.at("backend", ""), "backend");
  if (backend != "torch")
    throw EngineError(source + ": a '" + backend + "' engine; dsv3-run runs only torch-backend engines");
  const Json& files = manifest.at("files", "");
  check_files(c, files);
  check_backend_info(c, manifest.at("backend_info", ""), files);
  const ModelSizes m = check_model(c, manifest.at("model", ""));
  check_specs(c, manifest.at("inputs", ""), "inputs");
  check_specs(c, manifest.at("outputs", ""), "outputs");
  check_logits(c, manifest.at("outputs", ""), m);
  check_kv_cache(c, manifest.at("kv_cache", ""), manifest.at("inputs", ""), m);
  return m;
}

void check_payload_sizes(const std::string& weights_path, const ModelSizes& model, const std::string& source) {
  std::unordered_map<std::string, std::vector<int64_t>> shapes;
  try {
    shapes = safetensors_shapes(weights_path);
  } catch (const std::runtime_error& e) {  // intact by its hash, so written wrong
    throw EngineError(std::string(e.what()) + " (not a readable safetensors file)");
  }
  const Checks c(source);
  const std::string file = std::filesystem::path(weights_path).filename().string();
  auto rows = [&](const char* name) -> int64_t {
    auto it = shapes.find(name);
    return it == shapes.end() || it->second.empty() ? -1 : it->second[0];
  };
  const int64_t embed = rows("embed.weight");
  if (embed >= 0 && embed != model.vocab_size)
    c.bad("model.vocab_size", "is " + std::to_string(model.vocab_size) + " but the payload's embedding (" + file +
                                  " embed.weight) has " + std::to_string(embed) + " rows");
  for (const char* table : {"rope_cos", "rope_sin"}) {
    const int64_t positions = rows(table);
    if (positions >= 0 && positions != model.max_seq_len)
      c.bad("model.max_seq_len", "is " + std::to_string(model.max_seq_len) + " but the payload's rope table (" + file +
                                     " " + table + ") has " + std::to_string(positions) + " positions");
  }
  // Beyond the Python side: the cache dsv3-run allocates [b, n_layers, T, kv_lora_rank + qk_rope_head_dim] against
  // the layers and tables the weights hold, so that edits of the model and the cache specs together are refused
  // here, not deep in a package.
  int64_t layers = 0;
  for (const auto& [name, shape] : shapes) {
    if (name.rfind("layers.", 0) != 0) continue;
    const size_t dot = name.find('.', 7);
    const std::string index = name.substr(7, dot == std::string::npos ? std::string::npos : dot - 7);
    if (!index.empty() && index.size() < 10 && index.find_first_not_of("0123456789") == std::string::npos)
      layers = std::max<int64_t>(layers, std::stoll(index) + 1);
  }
  if (layers > 0 && layers != model.n_layers)
    c.bad("model.n_layers", "is " + std::to_string(model.n_layers) + " but the payload's weights (" + file +
                                ") hold layers 0.." + std::to_string(layers - 1));
  const int64_t latent = rows("layers.0.attn.kv_norm.weight");
  if (latent >= 0 && latent != model.kv_lora_rank)
    c.bad("model.kv_lora_rank", "is " + std::to_string(model.kv_lora_rank) + " but the payload's kv_norm (" + file +
                                    " layers.0.attn.kv_norm.weight) has " + std::to_string(latent) + " rows");
  auto rope = shapes.find("rope_cos");
  if (rope != shapes.end() && rope->second.size() == 2 && rope->second[1] * 2 != model.qk_rope_head_dim)
    c.bad("model.qk_rope_head_dim", "is " + std::to_string(model.qk_rope_head_dim) + " but the payload's rope table (" +
                                        file + " rope_cos) has " + std::to_string(rope->second[1]) +
                                        " columns (qk_rope_head_dim / 2)");
}

}  // namespace dsv3
