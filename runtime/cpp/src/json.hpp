// Minimal JSON reader for manifest.json and safetensors headers: objects, arrays, strings
// (with \u escapes to UTF-8), numbers, true/false/null. Read-only; errors throw with the offset.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dsv3 {

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  static Json parse(const std::string& text, const std::string& source = "json");

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_object() const { return type_ == Type::Object; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_string() const { return type_ == Type::String; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_bool() const { return type_ == Type::Bool; }

  // Typed access; throws std::runtime_error naming `what` when the type is wrong.
  const std::string& as_string(const std::string& what) const;
  int64_t as_int(const std::string& what) const;
  double as_double(const std::string& what) const;
  bool as_bool(const std::string& what) const;
  const std::vector<Json>& as_array(const std::string& what) const;
  const std::vector<std::pair<std::string, Json>>& as_object(const std::string& what) const;

  // Object member or nullptr.
  const Json* find(const std::string& key) const;
  // Object member; throws naming `what` and the key when absent.
  const Json& at(const std::string& key, const std::string& what) const;

  // Compact JSON text of the value (numbers as written), cut to max_chars with "...": for messages.
  std::string dump(size_t max_chars = 80) const;

 private:
  friend class JsonParser;
  void dump_into(std::string& out, size_t max_chars) const;
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0.0;
  std::string text_;  // string value, or a number's literal text (exact integers)
  std::vector<Json> array_;
  std::vector<std::pair<std::string, Json>> object_;
};

}  // namespace dsv3
