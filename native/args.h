// Argument checks shared by all bindings: each throws a TypeError naming the argument instead of guessing.
#pragma once

#include <napi.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace virtnbd {

[[noreturn]] inline void BadArg(const Napi::CallbackInfo& info, const char* name, const char* what) {
  throw Napi::TypeError::New(info.Env(), std::string(name) + " must be " + what);
}

inline std::string ArgString(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsString()) BadArg(info, name, "a string");
  return info[i].As<Napi::String>().Utf8Value();
}

// Offsets and lengths: JS numbers are exact up to 2^53, which is the limit accepted here.
inline uint64_t ArgU64(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsNumber()) BadArg(info, name, "a number");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!(v >= 0 && v <= 9007199254740991.0) || std::floor(v) != v) BadArg(info, name, "an integer in [0, 2^53)");
  return static_cast<uint64_t>(v);
}

inline uint32_t ArgU32(const Napi::CallbackInfo& info, size_t i, const char* name) {
  uint64_t v = ArgU64(info, i, name);
  if (v > UINT32_MAX) BadArg(info, name, "an integer in [0, 2^32)");
  return static_cast<uint32_t>(v);
}

inline int32_t ArgI32(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsNumber()) BadArg(info, name, "a number");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!(v >= INT32_MIN && v <= INT32_MAX) || std::floor(v) != v) BadArg(info, name, "a 32-bit integer");
  return static_cast<int32_t>(v);
}

inline bool ArgBool(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsBoolean()) BadArg(info, name, "a boolean");
  return info[i].As<Napi::Boolean>().Value();
}

inline Napi::Buffer<uint8_t> ArgBuffer(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsBuffer()) BadArg(info, name, "a Buffer");
  return info[i].As<Napi::Buffer<uint8_t>>();
}

inline std::vector<std::string> ArgStrings(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsArray()) BadArg(info, name, "an array of strings");
  Napi::Array array = info[i].As<Napi::Array>();
  std::vector<std::string> out;
  for (uint32_t k = 0; k < array.Length(); k++) {
    Napi::Value item = array.Get(k);
    if (!item.IsString()) BadArg(info, name, "an array of strings");
    out.push_back(item.As<Napi::String>().Utf8Value());
  }
  return out;
}

// A string, or null/undefined for "none" (libvirt's optional XML arguments).
inline std::optional<std::string> ArgOptString(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info[i].IsNull() || info[i].IsUndefined()) return std::nullopt;
  return ArgString(info, i, name);
}

inline Napi::Array ToArray(Napi::Env env, const std::vector<std::string>& items) {
  Napi::Array array = Napi::Array::New(env, items.size());
  for (size_t k = 0; k < items.size(); k++) array.Set(static_cast<uint32_t>(k), items[k]);
  return array;
}

}  // namespace virtnbd
