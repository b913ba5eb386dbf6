#include "engine.hpp"

#include <sys/utsname.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "json.hpp"
#include "manifest_checks.hpp"
#include "safetensors.hpp"
#include "sha256.hpp"

#ifdef DSV3_WITH_CUDA
#include <cuda_runtime_api.h>
#include <torch/cuda.h>
#endif

namespace fs = std::filesystem;

namespace dsv3 {
namespace {

constexpr const char* kManifestName = "manifest.json";

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw EngineError(path.string() + ": cannot read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Same rule as dsv3_export/manifest.py _check_name: one plain path component.
void check_name(const std::string& name) {
  if (name.empty() || name == "." || name == ".." || name == kManifestName || name.find('/') != std::string::npos ||
      name.find('\\') != std::string::npos || name[0] == '.')
    throw EngineError("manifest lists an invalid payload file name '" + name + "'");
}

// The directory holds exactly the listed files, each a regular file of the recorded size and hash.
void verify_files(const fs::path& dir, const Json& manifest, bool verify_hashes) {
  const auto& files = manifest.at("files", kManifestName).as_object("manifest 'files'");
  std::set<std::string> listed;
  for (const auto& [name, entry] : files) {
    check_name(name);
    listed.insert(name);
  }
  for (const auto& item : fs::directory_iterator(dir)) {
    const std::string name = item.path().filename().string();
    if (item.is_symlink())
      throw EngineError(item.path().string() + ": is a symlink; an engine directory holds only regular files");
    if (name != kManifestName && listed.count(name) == 0)
      throw EngineError(item.path().string() + ": unexpected " + (item.is_directory() ? "directory" : "file") +
                        " (not listed in manifest.json)");
  }
  for (const auto& [name, entry] : files) {
    const fs::path p = dir / name;
    const std::string what = "manifest files['" + name + "']";
    if (!fs::exists(p)) throw EngineError(p.string() + ": missing (listed in manifest.json)");
    if (!fs::is_regular_file(p)) throw EngineError(p.string() + ": not a regular file");
    const auto size = static_cast<int64_t>(fs::file_size(p));
    const int64_t want = entry.at("size", what).as_int(what + " size");
    if (size != want)
      throw EngineError(p.string() + ": size " + std::to_string(size) + " differs from the manifest's " +
                        std::to_string(want) + " (file altered)");
    if (verify_hashes) {
      const std::string& sha = entry.at("sha256", what).as_string(what + " sha256");
      const std::string got = sha256_file(p.string());
      if (got != sha)
        throw EngineError(p.string() + ": sha256 " + got.substr(0, 16) + "... does not match the manifest's " +
                          sha.substr(0, 16) + "... (file altered or corrupt)");
    }
  }
}

std::set<std::string> cpu_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    key.erase(key.find_last_not_of(" \t") + 1);
    if (key == "flags" || key == "Features") {
      std::istringstream words(line.substr(colon + 1));
      std::set<std::string> flags;
      for (std::string w; words >> w;) flags.insert(w);
      return flags;
    }
  }
  return {};
}

// Throws EngineError when this machine cannot run the packages (see engines/torch_device.py).
c10::Device check_device(const Json& info) {
  const std::string kind = info.at("device_kind", "backend_info").as_string("backend_info.device_kind");
  struct utsname u {};
  ::uname(&u);
  const Json* machine = info.find("machine");
  if (machine != nullptr && machine->is_string() && machine->as_string("machine") != u.machine)
    throw EngineError("the engine was built for " + machine->as_string("machine") + " CPUs, this machine is " +
                      u.machine);
  if (kind == "cpu") {
    const auto have = cpu_flags();
    std::string missing;
    for (const Json& f : info.at("cpu_flags_required", "backend_info").as_array("backend_info.cpu_flags_required")) {
      const std::string& flag = f.as_string("cpu flag");
      if (have.count(flag) == 0) missing += (missing.empty() ? "" : ", ") + flag;
    }
    if (!missing.empty()) {
      const Json* isa = info.find("cpu_isa");
      throw EngineError("the engine was compiled for CPU ISA '" +
                        (isa != nullptr && isa->is_string() ? isa->as_string("cpu_isa") : std::string("?")) +
                        "'; this CPU lacks " + missing + ": rebuild the engine on this machine");
    }
    return c10::Device(c10::kCPU);
  }
  if (kind != "cuda") throw EngineError("backend_info.device_kind is '" + kind + "', expected 'cpu' or 'cuda'");
#ifdef DSV3_WITH_CUDA
  if (!torch::cuda::is_available()) throw EngineError("the engine was built for CUDA but no CUDA device is visible");
  cudaDeviceProp prop{};
  int dev = 0;
  cudaGetDevice(&dev);
  if (cudaGetDeviceProperties(&prop, dev) != cudaSuccess) throw EngineError("cannot query the CUDA device");
  const std::string have = std::to_string(prop.major) + "." + std::to_string(prop.minor);
  const std::string want = info.at("compute_capability", "backend_info").as_string("backend_info.compute_capability");
  if (have != want)
    throw EngineError("the engine's kernels were built for compute capability " + want + ", this GPU (" + prop.name +
                      ") is " + have + ": rebuild the engine on this GPU");
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(dev));
#else
  throw EngineError("the engine was built for CUDA, but this dsv3-run was built against a CPU-only libtorch");
#endif
}

c10::ScalarType dtype_from_name(const std::string& name) {
  if (name == "float32") return c10::kFloat;
  if (name == "bfloat16") return c10::kBFloat16;
  if (name == "float16") return c10::kHalf;
  throw EngineError("manifest kv_cache.dtype '" + name + "' is not float32, bfloat16 or float16");
}

// The manifest's name of a dtype (Python's str(torch.dtype) without "torch.").
std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "float32";
    case c10::kBFloat16: return "bfloat16";
    case c10::kHalf: return "float16";
    case c10::kDouble: return "float64";
    case c10::kLong: return "int64";
    case c10::kInt: return "int32";
    case c10::kBool: return "bool";
    case c10::kFloat8_e4m3fn: return "float8_e4m3fn";
    default: return c10::toString(t);
  }
}

std::vector<int64_t> int_list(const Json& value, const std::string& what) {
  std::vector<int64_t> out;
  for (const Json& v : value.as_array(what)) out.push_back(v.as_int(what));
  return out;
}

// A constant as the package was compiled for it (backend_info.constants, engines/torch_step.py's
// constant_records): the package indexes it with that dtype, shape and strides and checks none of
// it, so a mismatch is refused here, the recorded strides are restored (the weights file stores
// contiguous copies) and a constant the build kept on the CPU stays there.
at::Tensor checked_constant(const fs::path& path, const std::string& fqn, const at::Tensor& t, const Json& record) {
  const std::string what = "backend_info.constants." + fqn;
  const std::string dtype = record.at("dtype", what).as_string(what + ".dtype");
  const std::vector<int64_t> shape = int_list(record.at("shape", what), what + ".shape");
  if (dtype_name(t.scalar_type()) != dtype || t.sizes().vec() != shape) {
    std::ostringstream msg;
    msg << path.string() << ": constant '" << fqn << "' is " << dtype_name(t.scalar_type()) << " " << t.sizes()
        << " in the weights file, the package was compiled for " << dtype << " " << c10::IntArrayRef(shape);
    throw EngineError(msg.str());
  }
  at::Tensor out = t;
  const Json* device = record.find("device");
  if (device != nullptr && device->as_string(what + ".device") == "cpu" && !t.device().is_cpu()) out = t.to(c10::kCPU);
  const Json* stride = record.find("stride");
  if (stride != nullptr && !stride->is_null() && out.numel() > 1) {
    const std::vector<int64_t> want = int_list(*stride, what + ".stride");
    if (out.strides().vec() != want) out = at::empty_strided(out.sizes(), want, out.options()).copy_(out);
  }
  return out;
}

std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load_package(
    const fs::path& path, std::unordered_map<std::string, at::Tensor>& weights, const c10::Device& device,
    const Json* records) {
  auto loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
      // single-threaded like the Python runtime (engines/torch_step.py): the thread-safe run adds
      // event record/sync and runner-pool moves per call that this one-caller runtime never needs
      path.string(), "model", /*run_single_threaded=*/true, /*num_runners=*/1,
      device.is_cuda() ? device.index() : static_cast<c10::DeviceIndex>(-1));
  std::unordered_map<std::string, at::Tensor> constants;
  for (const std::string& fqn : loader->get_constant_fqns()) {
    auto it = weights.find(fqn);
    if (it == weights.end())
      throw EngineError(path.string() + ": package needs constant '" + fqn + "', missing from the weights file");
    if (records == nullptr) {  // engines built before the build recorded its constants: names only
      constants.emplace(fqn, it->second);
      continue;
    }
    const Json* record = records->find(fqn);
    if (record == nullptr)
      throw EngineError(path.string() + ": package needs constant '" + fqn + "', which the build did not record");
    at::Tensor placed = checked_constant(path, fqn, it->second, *record);
    if (!placed.is_same(it->second)) it->second = placed;  // one placed copy, shared by both packages
    constants.emplace(fqn, placed);
  }
  loader->load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
  return loader;
}

}  // namespace

Engine::Engine(const std::string& engine_dir, bool verify_hashes) : dir_(engine_dir) {
  const fs::path dir(engine_dir);
  if (!fs::is_directory(dir)) throw EngineError(engine_dir + ": not a directory");
  const fs::path manifest_path = dir / kManifestName;
  if (!fs::exists(manifest_path)) throw EngineError(manifest_path.string() + ": missing (not an engine directory)");
  if (fs::is_symlink(manifest_path) || !fs::is_regular_file(manifest_path))
    throw EngineError(manifest_path.string() + ": not a regular file");
  Json manifest;
  try {
    manifest = Json::parse(read_text(manifest_path), manifest_path.string());
  } catch (const std::runtime_error& e) {
    throw EngineError(e.what());
  }
  try {
    // manifest.json is not hashed: every key read below is checked first (manifest_checks.hpp)
    check_format_version(manifest, manifest_path.string());
    const ModelSizes model = check_manifest(manifest, manifest_path.string());
    verify_files(dir, manifest, verify_hashes);
    const Json& info = manifest.at("backend_info", kManifestName);
    try {
      device_ = check_device(info);
    } catch (const EngineError& e) {
      throw EngineError(engine_dir + ": cannot run this engine here: " + e.what());
    }
    n_layers_ = model.n_layers;
    cache_width_ = model.cache_width();
    max_seq_len_ = model.max_seq_len;
    max_batch_size_ = model.max_batch_size;
    vocab_size_ = model.vocab_size;
    cache_dtype_ = dtype_from_name(manifest.at("kv_cache", kManifestName).at("dtype", "kv_cache").as_string("kv_cache.dtype"));
    const std::string weights = (dir / info.at("weights", "backend_info").as_string("backend_info.weights")).string();
    check_payload_sizes(weights, model, manifest_path.string());  // header only, before reading the tensors
    weights_ = load_safetensors(weights, device_);
    const Json& packages = info.at("packages", "backend_info");
    const Json* records = info.find("constants");
    if (records != nullptr && records->is_null()) records = nullptr;  // as absent: names only
    prefill_ = load_package(dir / packages.at("prefill", "packages").as_string("packages.prefill"), weights_, device_,
                            records);
    decode_ = load_package(dir / packages.at("decode", "packages").as_string("packages.decode"), weights_, device_,
                           records);
  } catch (const EngineError&) {
    throw;
  } catch (const std::exception& e) {
    throw EngineError(engine_dir + ": " + e.what());
  }
}

Engine::~Engine() = default;

std::pair<at::Tensor, at::Tensor> Engine::step(const at::Tensor& tokens, const at::Tensor& start_pos,
                                               const at::Tensor& kv_cache) {
  if (tokens.dim() != 2 || tokens.scalar_type() != c10::kLong)
    throw EngineError("step: tokens must be int64 [b, s]");
  if (start_pos.dim() != 1 || start_pos.scalar_type() != c10::kLong || start_pos.size(0) != tokens.size(0))
    throw EngineError("step: start_pos must be int64 [b]");
  if (kv_cache.dim() != 4 || kv_cache.scalar_type() != cache_dtype_ || kv_cache.size(0) != tokens.size(0) ||
      kv_cache.size(1) != n_layers_ || kv_cache.size(3) != cache_width_ || !kv_cache.is_contiguous())
    throw EngineError("step: kv_cache must be a contiguous [b, " + std::to_string(n_layers_) + ", T, " +
                      std::to_string(cache_width_) + "] tensor of the engine's cache dtype");
  auto& package = tokens.size(1) == 1 ? decode_ : prefill_;
  std::vector<at::Tensor> outputs = package->run({tokens, start_pos, kv_cache});
  if (outputs.size() != 2) throw EngineError("step: package returned " + std::to_string(outputs.size()) + " outputs, expected 2");
  return {outputs[0], outputs[1]};
}

std::vector<int64_t> Engine::generate(const std::vector<int64_t>& prompt, int64_t max_new_tokens, int64_t cache_len) {
  const auto n = static_cast<int64_t>(prompt.size());
  if (n == 0) throw EngineError("generate: empty prompt");
  if (max_new_tokens < 1) throw EngineError("generate: max_new_tokens must be >= 1");
  for (int64_t id : prompt)
    if (id < 0 || id >= vocab_size_)
      throw EngineError("generate: token id " + std::to_string(id) + " outside the vocabulary [0, " +
                        std::to_string(vocab_size_) + ")");
  if (cache_len == 0) cache_len = n + max_new_tokens - 1;  // the last new token is not fed back
  if (cache_len < n + max_new_tokens - 1 || cache_len > max_seq_len_)
    throw EngineError("generate: cache length " + std::to_string(cache_len) + " must hold prompt + new tokens (" +
                      std::to_string(n + max_new_tokens - 1) + ") and be <= max_seq_len " + std::to_string(max_seq_len_));
  c10::InferenceMode guard;
  const auto ids = at::TensorOptions().dtype(c10::kLong).device(device_);
  at::Tensor kv_cache = at::zeros({1, n_layers_, cache_len, cache_width_}, at::TensorOptions().dtype(cache_dtype_).device(device_));
  at::Tensor tokens = at::tensor(prompt, at::TensorOptions().dtype(c10::kLong)).view({1, n}).to(device_);
  at::Tensor start_pos = at::zeros({1}, ids);

  std::vector<int64_t> out;
  int64_t pos = 0;
  while (true) {
    auto [logits, new_kv] = step(tokens, start_pos, kv_cache);
    const int64_t s = tokens.size(1);
    kv_cache.slice(/*dim=*/2, pos, pos + s).copy_(new_kv);  // in place: rows [pos, pos + s)
    pos += s;
    const int64_t next = logits.select(1, s - 1).argmax(-1).item<int64_t>();
    out.push_back(next);
    if (static_cast<int64_t>(out.size()) == max_new_tokens) break;
    tokens = at::full({1, 1}, next, ids);
    start_pos = at::full({1}, pos, ids);
  }
  return out;
}

}  // namespace dsv3
