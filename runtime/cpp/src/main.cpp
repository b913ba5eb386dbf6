// dsv3-run ENGINE_DIR --prompt-ids 1,2,3 [--max-new-tokens 32] [--cache-len N] [--no-verify-hashes]
// Greedy generation with a torch-backend engine, no Python. Prints {"tokens":[...]} (the new
// tokens) on stdout; errors go to stderr. Exit codes as dsv3-export: 0 ok, 1 failure, 2 usage.
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "engine.hpp"

namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

const char* kUsage =
    "usage: dsv3-run ENGINE_DIR --prompt-ids 1,2,3 [--max-new-tokens 32] [--cache-len N] [--no-verify-hashes]\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int64_t parse_int(const std::string& text, const std::string& what) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty()) throw UsageError(what + ": '" + text + "' is not an integer");
  return v;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) ids.push_back(parse_int(item, "--prompt-ids"));
  if (ids.empty()) throw UsageError("--prompt-ids: give at least one token id");
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  std::string engine_dir;
  std::vector<int64_t> prompt;
  int64_t max_new_tokens = 32, cache_len = 0;
  bool verify_hashes = true;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto value = [&](const std::string& flag) -> std::string {
        if (i + 1 >= argc) throw UsageError(flag + " needs a value");
        return argv[++i];
      };
      if (arg == "--prompt-ids") prompt = parse_ids(value(arg));
      else if (arg == "--max-new-tokens") max_new_tokens = parse_int(value(arg), arg);
      else if (arg == "--cache-len") cache_len = parse_int(value(arg), arg);
      else if (arg == "--no-verify-hashes") verify_hashes = false;
      else if (arg == "-h" || arg == "--help") {
        std::cout << kUsage;
        return 0;
      } else if (!arg.empty() && arg[0] == '-') throw UsageError("unknown option " + arg);
      else if (engine_dir.empty()) engine_dir = arg;
      else throw UsageError("unexpected argument " + arg);
    }
    if (engine_dir.empty()) throw UsageError("missing ENGINE_DIR");
    if (prompt.empty()) throw UsageError("missing --prompt-ids");
    if (max_new_tokens < 1) throw UsageError("--max-new-tokens must be >= 1");
  } catch (const UsageError& e) {
    std::cerr << "dsv3-run: " << e.what() << "\n" << kUsage;
    return kExitUsage;
  }
  try {
    dsv3::Engine engine(engine_dir, verify_hashes);
    const std::vector<int64_t> tokens = engine.generate(prompt, max_new_tokens, cache_len);
    std::cout << "{\"tokens\":[";
    for (size_t i = 0; i < tokens.size(); ++i) std::cout << (i ? "," : "") << tokens[i];
    std::cout << "]}" << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "dsv3-run: error: " << e.what() << "\n";
    return kExitFailure;
  }
}
