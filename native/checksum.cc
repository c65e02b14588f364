// Checksums of payload pieces on the threadpool, so the event loop only combines per-piece adler32 values in
// stream order (adler32_combine) and never scans the data itself. SHA-256 comes from the OpenSSL that Node
// exports to addons (hardware-accelerated where the CPU has SHA extensions).
#include "checksum.h"

#include <openssl/evp.h>
#include <zlib.h>

#include <cstdio>
#include <optional>
#include <string>

#include "adler32.h"
#include "args.h"
#include "async.h"

namespace virtnbd {

namespace {

struct PieceSums {
  uint32_t adler = 1;
  bool withSha = false;
  unsigned char sha[EVP_MAX_MD_SIZE];
  unsigned int shaLength = 0;
};

Napi::Value ToObject(Napi::Env env, PieceSums& sums) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("adler32", Napi::Number::New(env, static_cast<double>(sums.adler)));
  if (sums.withSha) {
    std::string hex(sums.shaLength * 2, '0');
    for (unsigned int i = 0; i < sums.shaLength; i++) snprintf(&hex[i * 2], 3, "%02x", sums.sha[i]);
    out.Set("sha256", Napi::String::New(env, hex));
  }
  return out;
}

// checksumPiece(buffer, withSha256): Promise<{ adler32, sha256? }>, adler32 starting from 1.
Napi::Value ChecksumPiece(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    Napi::Buffer<uint8_t> source = ArgBuffer(info, 0, "buffer");
    bool withSha = ArgBool(info, 1, "withSha256");
    const uint8_t* data = source.Data();
    size_t length = source.Length();
    auto run = [data, length, withSha](PieceSums& sums) -> std::optional<Failure> {
      sums.adler = FastAdler32(1, data, length);
      sums.withSha = withSha;
      if (withSha && EVP_Digest(data, length, sums.sha, &sums.shaLength, EVP_sha256(), nullptr) != 1) {
        return Failure{"SHA-256 digest failed", std::nullopt, "openssl"};
      }
      return std::nullopt;
    };
    return PromiseWorker<PieceSums>::Start(info.Env(), run, ToObject, {source});
  });
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
  exports.Set("adler32Combine", Napi::Function::New(env, Adler32Combine, "adler32Combine"));
}

}  // namespace virtnbd
