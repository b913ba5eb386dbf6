// Reading a .safetensors file into torch tensors: 8-byte little-endian header length, a JSON
// header {name: {dtype, shape, data_offsets}}, then the raw data. No pickle anywhere.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace dsv3 {

// Every tensor of the file, copied into memory owned by torch on `device` (CPU copies are
// aligned, so packages never see a misaligned weight). Throws naming the file and the tensor.
std::unordered_map<std::string, at::Tensor> load_safetensors(const std::string& path, const c10::Device& device);

// Name -> shape of every tensor of the file, from its header alone (the data is not read).
std::unordered_map<std::string, std::vector<int64_t>> safetensors_shapes(const std::string& path);

}  // namespace dsv3
