// LZ4 frame compression for backup chunks (compatible with Python's lz4.frame), run on the threadpool.
#pragma once

#include <napi.h>

namespace virtnbd {

// Exports lz4FrameBound, lz4CompressPiece, lz4DecompressFrame and lz4DecompressInto.
void InitLz4(Napi::Env env, Napi::Object exports);

}  // namespace virtnbd
