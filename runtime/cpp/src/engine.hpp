// A torch-backend engine directory (engines/torch.py) loaded from C++, no Python:
// manifest.json checked and every payload file verified (size + sha256), the device checked
// against what the packages were compiled for, weights.safetensors loaded once and handed to
// both AOTInductor packages (prefill.pt2, decode.pt2) as user-managed constants.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace torch::inductor {
class AOTIModelPackageLoader;
}  // namespace torch::inductor

namespace dsv3 {

// An engine directory that must not be loaded, or a request it cannot serve; the message says why.
class EngineError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The manifest format this reader understands (dsv3_export/manifest.py FORMAT_VERSION) and the
// torch payload layout (engines/torch.py PAYLOAD_LAYOUT).
constexpr int64_t kFormatVersion = 1;
constexpr const char* kPayloadLayout = "aoti-packages+safetensors/1";

class Engine {
 public:
  // Throws EngineError naming the file and the reason when the directory cannot be trusted or
  // run here. verify_hashes=false skips only the sha256 pass (sizes are always checked).
  explicit Engine(const std::string& engine_dir, bool verify_hashes = true);
  ~Engine();

  // LatentCacheStep's contract: tokens [b, s] int64, start_pos [b] int64, kv_cache [b, L, T, w]
  // -> {logits [b, s, V] float32, new_kv [b, L, s, w]}. s == 1 runs decode.pt2, else prefill.pt2.
  std::pair<at::Tensor, at::Tensor> step(const at::Tensor& tokens, const at::Tensor& start_pos,
                                         const at::Tensor& kv_cache);

  // Greedy decoding of one prompt: prefill, then max_new_tokens - 1 decode steps over a static
  // cache of cache_len positions (0: prompt + max_new_tokens) written in place. Returns the new tokens.
  std::vector<int64_t> generate(const std::vector<int64_t>& prompt, int64_t max_new_tokens, int64_t cache_len = 0);

  const c10::Device& device() const { return device_; }
  c10::ScalarType cache_dtype() const { return cache_dtype_; }
  int64_t n_layers() const { return n_layers_; }
  int64_t cache_width() const { return cache_width_; }
  int64_t max_seq_len() const { return max_seq_len_; }

 private:
  std::string dir_;
  c10::Device device_{c10::kCPU};
  c10::ScalarType cache_dtype_ = c10::kFloat;
  int64_t n_layers_ = 0, cache_width_ = 0, max_seq_len_ = 0, max_batch_size_ = 0, vocab_size_ = 0;
  std::unordered_map<std::string, at::Tensor> weights_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> prefill_, decode_;
};

}  // namespace dsv3
