// Checksums of payload pieces on the threadpool, so the event loop only combines per-piece adler32 values in
// stream order (adler32_combine) and never scans the data itself. Piece digests: BLAKE3 (Debian's reference C
// implementation, several GB/s per core) for new backups; SHA-256 from the OpenSSL that Node exports to addons
// for the digest files of earlier ones.
#include "checksum.h"

#include <blake3.h>
#include <openssl/evp.h>
#include <zlib.h>

#include <cstdio>
#include <cstring>
#include <optional>
#include <string>

#include "adler32.h"
#include "args.h"
#include "async.h"

namespace virtnbd {

std::string Hex(const PieceSums& sums) {
  std::string hex(sums.hashLength * 2, '0');
  for (unsigned int i = 0; i < sums.hashLength; i++) snprintf(&hex[i * 2], 3, "%02x", sums.hash[i]);
  return hex;
}

Digest ArgDigest(const Napi::CallbackInfo& info, size_t index) {
  if (info.Length() <= index || info[index].IsUndefined() || info[index].IsNull()) return Digest::kNone;
  std::string name = ArgString(info, index, "digest");
  if (name == "blake3") return Digest::kBlake3;
  if (name == "sha256") return Digest::kSha256;
  throw Napi::TypeError::New(info.Env(), "digest must be 'blake3', 'sha256' or undefined");
}

PieceSummer::PieceSummer(Digest digest, bool withAdler) : digest_(digest), withAdler_(withAdler) {
  if (digest_ == Digest::kBlake3) blake3_hasher_init(&blake3_);
  if (digest_ == Digest::kSha256) {
    sha256_ = EVP_MD_CTX_new();
    sha256Ok_ = sha256_ != nullptr && EVP_DigestInit_ex(sha256_, EVP_sha256(), nullptr) == 1;
  }
}

PieceSummer::~PieceSummer() {
  if (sha256_) EVP_MD_CTX_free(sha256_);
}

void PieceSummer::Update(const uint8_t* data, size_t length) {
  if (withAdler_) adler_ = FastAdler32(adler_, data, length);
  if (digest_ == Digest::kBlake3) blake3_hasher_update(&blake3_, data, length);
  if (digest_ == Digest::kSha256 && sha256Ok_) sha256Ok_ = EVP_DigestUpdate(sha256_, data, length) == 1;
}

std::optional<Failure> PieceSummer::Finish(PieceSums& sums) {
  sums.adler = adler_;
  sums.digest = digest_;
  if (digest_ == Digest::kBlake3) {
    blake3_hasher_finalize(&blake3_, sums.hash, BLAKE3_OUT_LEN);
    sums.hashLength = BLAKE3_OUT_LEN;
  }
  if (digest_ == Digest::kSha256 && (!sha256Ok_ || EVP_DigestFinal_ex(sha256_, sums.hash, &sums.hashLength) != 1)) {
    return Failure{"SHA-256 digest failed", std::nullopt, "openssl"};
  }
  return std::nullopt;
}

std::optional<Failure> ComputeSums(const uint8_t* data, size_t length, Digest digest, bool withAdler, PieceSums& sums) {
  PieceSummer summer(digest, withAdler);
  summer.Update(data, length);
  return summer.Finish(sums);
}

Napi::Value SumsToObject(Napi::Env env, PieceSums& sums) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("adler32", Napi::Number::New(env, static_cast<double>(sums.adler)));
  if (sums.digest != Digest::kNone) out.Set("digest", Napi::String::New(env, Hex(sums)));
  return out;
}

namespace {

// Queues the sums of buffer argument 0 on the threadpool: the adler32 when `withAdler`, and `digest`.
Napi::Value StartPieceSums(const Napi::CallbackInfo& info, Digest digest, bool withAdler, PromiseWorker<PieceSums>::Settle settle) {
  Napi::Buffer<uint8_t> source = ArgBuffer(info, 0, "buffer");
  const uint8_t* data = source.Data();
  size_t length = source.Length();
  auto run = [data, length, digest, withAdler](PieceSums& sums) { return ComputeSums(data, length, digest, withAdler, sums); };
  return PromiseWorker<PieceSums>::Start(info.Env(), run, settle, {source});
}

// checksumPiece(buffer, digest?): Promise<{ adler32, digest? }>, adler32 starting from 1, digest as hex.
Napi::Value ChecksumPiece(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] { return StartPieceSums(info, ArgDigest(info, 1), true, SumsToObject); });
}

// digestPiece(buffer, digest): Promise<hex>, for callers that need no adler32 of the same bytes.
Napi::Value DigestPiece(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    Digest digest = ArgDigest(info, 1);
    if (digest == Digest::kNone) throw Napi::TypeError::New(info.Env(), "digestPiece needs 'blake3' or 'sha256'");
    return StartPieceSums(info, digest, false, [](Napi::Env env, PieceSums& sums) -> Napi::Value { return Napi::String::New(env, Hex(sums)); });
  });
}

// checksumPieceSync(buffer, digest?, into?, at?): adler32 (from 1), with the raw digest written to into[at..] when
// `digest` is given. For small pieces, where a threadpool round trip costs more than the sums themselves.
Napi::Value ChecksumPieceSync(const Napi::CallbackInfo& info) {
  Napi::Buffer<uint8_t> source = ArgBuffer(info, 0, "buffer");
  Digest digest = ArgDigest(info, 1);
  PieceSums sums;
  std::optional<Failure> failure = ComputeSums(source.Data(), source.Length(), digest, true, sums);
  if (failure) throw MakeError(info.Env(), *failure);
  if (digest != Digest::kNone) {
    Napi::Buffer<uint8_t> into = ArgBuffer(info, 2, "into");
    uint64_t at = ArgU64(info, 3, "at");
    if (at > into.Length() || into.Length() - at < sums.hashLength) BadArg(info, "at", "an offset with room for the digest in `into`");
    std::memcpy(into.Data() + at, sums.hash, sums.hashLength);
  }
  return Napi::Number::New(info.Env(), static_cast<double>(sums.adler));
}

// adler32Combine(a, b, lengthOfB): the adler32 of the concatenation, CPU-trivial, so synchronous.
Napi::Value Adler32Combine(const Napi::CallbackInfo& info) {
  uint32_t a = ArgU32(info, 0, "a");
  uint32_t b = ArgU32(info, 1, "b");
  uint64_t length = ArgU64(info, 2, "lengthOfB");
  return Napi::Number::New(info.Env(), static_cast<double>(adler32_combine(a, b, static_cast<z_off_t>(length))));
}

}  // namespace

void InitChecksum(Napi::Env env, Napi::Object exports) {
  exports.Set("checksumPiece", Napi::Function::New(env, ChecksumPiece, "checksumPiece"));
  exports.Set("digestPiece", Napi::Function::New(env, DigestPiece, "digestPiece"));
  exports.Set("checksumPieceSync", Napi::Function::New(env, ChecksumPieceSync, "checksumPieceSync"));
  exports.Set("adler32Combine", Napi::Function::New(env, Adler32Combine, "adler32Combine"));
}

}  // namespace virtnbd
