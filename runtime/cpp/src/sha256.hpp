// SHA-256 (FIPS 180-4), streaming, for verifying the manifest's file hashes without OpenSSL.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace dsv3 {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t len);
  std::array<uint8_t, 32> digest();  // finishes the hash; the object must not be updated after
  std::string hexdigest();

 private:
  void compress(const uint8_t* block);
  std::array<uint32_t, 8> h_;
  std::array<uint8_t, 64> buf_{};
  size_t buf_len_ = 0;
  uint64_t total_len_ = 0;
};

// Lowercase hex SHA-256 of a whole file; throws naming the path on I/O errors.
std::string sha256_file(const std::string& path);

}  // namespace dsv3
