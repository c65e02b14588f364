// Checksums of payload pieces on the threadpool (adler32 for .chksum, SHA-256 for digests).
#pragma once

#include <napi.h>

namespace virtnbd {

// Exports checksumPiece and adler32Combine.
void InitChecksum(Napi::Env env, Napi::Object exports);

}  // namespace virtnbd
