// Checksums of payload pieces (adler32 for .chksum, BLAKE3 or SHA-256 for piece digests), on the threadpool or inline.
#pragma once

#include <napi.h>
#include <openssl/evp.h>

#include <cstdint>
#include <optional>
#include <string>

#include <blake3.h>

#include "async.h"

namespace virtnbd {

enum class Digest { kNone, kSha256, kBlake3 };

// A piece's adler32 (from 1) and strong digest, as computed on a worker thread.
struct PieceSums {
  uint32_t adler = 1;
  Digest digest = Digest::kNone;
  unsigned char hash[EVP_MAX_MD_SIZE];
  unsigned int hashLength = 0;
};

// The digest as lowercase hex.
std::string Hex(const PieceSums& sums);

// Argument `index` as a Digest: undefined or null for none, else 'blake3' or 'sha256'.
Digest ArgDigest(const Napi::CallbackInfo& info, size_t index);

// Sums one piece fed in slices, in order: its adler32 (from 1) when `withAdler`, and `digest`. Any thread.
class PieceSummer {
 public:
  PieceSummer(Digest digest, bool withAdler);
  ~PieceSummer();
  PieceSummer(const PieceSummer&) = delete;
  PieceSummer& operator=(const PieceSummer&) = delete;

  void Update(const uint8_t* data, size_t length);
  // Fills `sums` with what was asked for; a failure of OpenSSL's SHA-256 at any step surfaces here.
  std::optional<Failure> Finish(PieceSums& sums);

 private:
  Digest digest_;
  bool withAdler_;
  uint32_t adler_ = 1;
  blake3_hasher blake3_;
  EVP_MD_CTX* sha256_ = nullptr;
  bool sha256Ok_ = true;
};

// The adler32 (when `withAdler`) and `digest` of [data, data+length) in one go; runs on any thread.
std::optional<Failure> ComputeSums(const uint8_t* data, size_t length, Digest digest, bool withAdler, PieceSums& sums);

// { adler32, digest? (hex) } for JS, as checksumPiece resolves.
Napi::Value SumsToObject(Napi::Env env, PieceSums& sums);

// Exports checksumPiece, digestPiece, checksumPieceSync and adler32Combine.
void InitChecksum(Napi::Env env, Napi::Object exports);

}  // namespace virtnbd
