#include "safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <utility>

#include <ATen/ATen.h>

#include "json.hpp"

namespace dsv3 {
namespace {

struct DtypeInfo {
  c10::ScalarType type;
  int64_t size;
};

DtypeInfo parse_dtype(const std::string& name, const std::string& where) {
  static const std::unordered_map<std::string, DtypeInfo> kTypes = {
      {"F64", {c10::kDouble, 8}},  {"F32", {c10::kFloat, 4}},   {"F16", {c10::kHalf, 2}},
      {"BF16", {c10::kBFloat16, 2}}, {"I64", {c10::kLong, 8}},  {"I32", {c10::kInt, 4}},
      {"I16", {c10::kShort, 2}},   {"I8", {c10::kChar, 1}},     {"U8", {c10::kByte, 1}},
      {"BOOL", {c10::kBool, 1}},   {"F8_E4M3", {c10::kFloat8_e4m3fn, 1}},
      {"F8_E5M2", {c10::kFloat8_e5m2, 1}}};
  auto it = kTypes.find(name);
  if (it == kTypes.end()) throw std::runtime_error(where + ": unsupported dtype " + name);
  return it->second;
}

// A read-only mapping of a whole file, unmapped on destruction.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY);
    if (fd_ < 0) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw std::runtime_error(path + ": cannot stat");
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
      if (data_ == MAP_FAILED) throw std::runtime_error(path + ": mmap failed: " + std::strerror(errno));
    }
  }
  ~MappedFile() {
    if (data_ != nullptr && data_ != MAP_FAILED) ::munmap(data_, size_);
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(data_); }
  size_t size() const { return size_; }

 private:
  std::string path_;
  int fd_ = -1;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// The JSON header (8-byte little-endian length, then the text) and the length of the data after it.
std::pair<Json, uint64_t> read_header(const MappedFile& file, const std::string& path) {
  if (file.size() < 8) throw std::runtime_error(path + ": too small to be a safetensors file");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file.data()[i];
  if (header_len > file.size() - 8) throw std::runtime_error(path + ": header length exceeds the file size");
  std::string header(reinterpret_cast<const char*>(file.data() + 8), header_len);
  Json meta = Json::parse(header, path + " (safetensors header)");
  meta.as_object(path + " header");
  return {std::move(meta), header_len};
}

std::vector<int64_t> parse_shape(const Json& entry, const std::string& where) {
  std::vector<int64_t> shape;
  for (const Json& d : entry.at("shape", where).as_array(where + " shape")) {
    int64_t n = d.as_int(where + " shape");
    if (n < 0) throw std::runtime_error(where + ": negative dimension");
    shape.push_back(n);
  }
  return shape;
}

}  // namespace

std::unordered_map<std::string, std::vector<int64_t>> safetensors_shapes(const std::string& path) {
  MappedFile file(path);  // mapped, not read: only the header's pages are touched
  const auto [meta, header_len] = read_header(file, path);
  std::unordered_map<std::string, std::vector<int64_t>> out;
  for (const auto& [name, entry] : meta.as_object(path + " header"))
    if (name != "__metadata__") out.emplace(name, parse_shape(entry, path + ": tensor '" + name + "'"));
  return out;
}

std::unordered_map<std::string, at::Tensor> load_safetensors(const std::string& path, const c10::Device& device) {
  MappedFile file(path);
  const auto [meta, header_len] = read_header(file, path);
  const uint8_t* base = file.data() + 8 + header_len;
  const uint64_t data_len = file.size() - 8 - header_len;

  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& [name, entry] : meta.as_object(path + " header")) {
    if (name == "__metadata__") continue;
    const std::string where = path + ": tensor '" + name + "'";
    DtypeInfo dt = parse_dtype(entry.at("dtype", where).as_string(where + " dtype"), where);
    const std::vector<int64_t> shape = parse_shape(entry, where);
    int64_t numel = 1;
    for (int64_t n : shape) numel *= n;
    const auto& offsets = entry.at("data_offsets", where).as_array(where + " data_offsets");
    if (offsets.size() != 2) throw std::runtime_error(where + ": data_offsets must be [begin, end]");
    int64_t begin = offsets[0].as_int(where + " data_offsets"), end = offsets[1].as_int(where + " data_offsets");
    if (begin < 0 || end < begin || static_cast<uint64_t>(end) > data_len)
      throw std::runtime_error(where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                               ") outside the data section (" + std::to_string(data_len) + " bytes)");
    if (end - begin != numel * dt.size)
      throw std::runtime_error(where + ": " + std::to_string(end - begin) + " bytes for " + std::to_string(numel) +
                               " elements of " + std::to_string(dt.size) + " bytes");
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dt.type).device(c10::kCPU));
    if (numel > 0) std::memcpy(t.data_ptr(), base + begin, static_cast<size_t>(end - begin));
    out.emplace(name, device.is_cpu() ? t : t.to(device));
  }
  return out;
}

}  // namespace dsv3
