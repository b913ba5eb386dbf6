// What dsv3-run checks in manifest.json beyond the payload hashes (dsv3_export/manifest_checks.py is the
// Python side). manifest.json is not itself hashed, so a hand edit that keeps every payload hash valid
// reaches code that trusts it: a vocab_size or max_seq_len above the payload's tables indexes past them
// inside the package (a libtorch abort), a cache of the wrong layers, width or dtype fails deep in it.
// So every key the runtime reads is checked for its JSON type and range, the specs it relies on against
// the model, and the model's vocabulary and positions against the weights file's tables. Every failure
// is an EngineError "<dir>/manifest.json: '<key>' <why, with the value found>".
#pragma once

#include <cstdint>
#include <string>

#include "json.hpp"

namespace dsv3 {

// The model sizes the runtime reads, each an integer in ModelArgs' range (reference/args.py).
struct ModelSizes {
  int64_t vocab_size = 0, n_layers = 0, max_seq_len = 0, max_batch_size = 0, kv_lora_rank = 0, qk_rope_head_dim = 0;
  // Values cached per token and layer: normalized latent + roped key (ModelArgs.latent_cache_width).
  int64_t cache_width() const { return kv_lora_rank + qk_rope_head_dim; }
};

// format_version: an integer in [1, kFormatVersion]. First, as a newer format may have other keys.
void check_format_version(const Json& manifest, const std::string& source);

// The keys dsv3-run reads: backend (only "torch" runs here), files, backend_info (device, layout, the
// weights and package files, constant records), model sizes, kv_cache, and the 'logits' output and
// 'kv_cache' input specs against the model. source names manifest.json in messages.
ModelSizes check_manifest(const Json& manifest, const std::string& source);

// model.vocab_size and max_seq_len against the rows of the embedding and rope tables in the weights
// file's header, as the Python side does; and, beyond it, the cache's n_layers, kv_lora_rank and
// qk_rope_head_dim against the layers, kv_norm and rope table it holds. A tensor not in the file is
// not checked. Called after the hashes: the header is then intact.
void check_payload_sizes(const std::string& weights_path, const ModelSizes& model, const std::string& source);

}  // namespace dsv3
