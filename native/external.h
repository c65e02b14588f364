// Native memory handed to JS as a Buffer that releases it, reported to V8 as external memory so that its GC runs
// (and frees them) as such buffers pile up. Never copied: aligned memory stays aligned.
#pragma once

#include <napi.h>

#include <cstdint>
#include <cstdlib>

namespace virtnbd {

// `reported`: the bytes the allocation really holds (an lz4 output buffer is larger than the frame in it).
// `release(data)` gives the memory back once the Buffer is collected.
template <typename Release>
inline Napi::Buffer<uint8_t> ExternalBuffer(Napi::Env env, uint8_t* data, size_t length, size_t reported, Release release) {
  int64_t bytes = static_cast<int64_t>(reported);
  Napi::MemoryManagement::AdjustExternalMemory(env, bytes);
  return Napi::Buffer<uint8_t>::New(env, data, length, [bytes, release](Napi::Env finalizing, uint8_t* p) {
    release(p);
    Napi::MemoryManagement::AdjustExternalMemory(finalizing, -bytes);
  });
}

// Malloc'ed memory, freed with free().
inline Napi::Buffer<uint8_t> ExternalBuffer(Napi::Env env, uint8_t* data, size_t length, size_t reported) {
  return ExternalBuffer(env, data, length, reported, [](uint8_t* p) { free(p); });
}

}  // namespace virtnbd
