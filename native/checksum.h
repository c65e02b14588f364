// Checksums of payload pieces (adler32 for .chksum, BLAKE3 or SHA-256 for piece digests), on the threadpool or inline.
#pragma once

#include <napi.h>

namespace virtnbd {

// Exports checksumPiece, digestPiece, checksumPieceSync and adler32Combine.
void InitChecksum(Napi::Env env, Napi::Object exports);

}  // namespace virtnbd
