// adler32 with AVX2 where the CPU has it (runtime check), zlib's adler32_z elsewhere; identical results.
#pragma once

#include <cstddef>
#include <cstdint>

namespace virtnbd {

// The adler32 of `length` bytes at `data`, continuing from `adler` (1 for a fresh sum), like zlib's adler32_z.
uint32_t FastAdler32(uint32_t adler, const uint8_t* data, size_t length);

}  // namespace virtnbd
