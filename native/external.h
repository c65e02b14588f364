// Malloc'ed memory handed to JS as a Buffer that frees it, reported to V8 as external memory so that its GC runs
// (and frees them) as such buffers pile up. Never copied: aligned memory stays aligned.
#pragma once

#include <napi.h>

#include <cstdint>
#include <cstdlib>

namespace virtnbd {

// `reported`: the bytes the allocation really holds (an lz4 output buffer is larger than the frame in it).
inline Napi::Buffer<uint8_t> ExternalBuffer(Napi::Env env, uint8_t* data, size_t length, size_t reported) {
  int64_t bytes = static_cast<int64_t>(reported);
  Napi::MemoryManagement::AdjustExternalMemory(env, bytes);
  return Napi::Buffer<uint8_t>::New(env, data, length, [bytes](Napi::Env finalizing, uint8_t* p) {
    free(p);
    Napi::MemoryManagement::AdjustExternalMemory(finalizing, -bytes);
  });
}

}  // namespace virtnbd
