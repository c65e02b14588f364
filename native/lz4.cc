// One LZ4 frame per call (content checksum on, 4 MB blocks) into the caller's buffer, summed in the same task;
// decompression rejects corrupt, truncated or padded input. Content checksums are XXH32 from libxxhash.
#include "lz4.h"

// For the LZ4F_errorCodes enum (a content checksum mismatch found here is reported as liblz4 would).
#define LZ4F_STATIC_LINKING_ONLY
#include <lz4frame.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>

#include "adler32.h"
#include "args.h"
#include "async.h"
#include "checksum.h"
#include "external.h"

namespace virtnbd {

namespace {

// malloc'ed output, handed to a Buffer without copying (free() is its finalizer).
struct Bytes {
  std::unique_ptr<uint8_t, decltype(&free)> data{nullptr, free};
  size_t length = 0;
  size_t capacity = 0;

  bool Reserve(size_t wanted) {
    wanted = std::max<size_t>(wanted, 1);
    void* grown = realloc(data.get(), wanted);
    if (!grown) return false;
    data.release();
    data.reset(static_cast<uint8_t*>(grown));
    capacity = wanted;
    return true;
  }

  uint8_t* Data() const { return data.get(); }
};

Failure Lz4Failure(size_t code) {
  return {LZ4F_getErrorName(code), static_cast<int>(0 - code), "lz4"};
}

Failure Lz4Failure(const char* message) { return {message, std::nullopt, "lz4"}; }

Napi::Value ToBuffer(Napi::Env env, Bytes& out) {
  size_t capacity = out.capacity;
  return ExternalBuffer(env, out.data.release(), out.length, capacity);
}

LZ4F_preferences_t FramePreferences(size_t length, int level) {
  LZ4F_preferences_t prefs;
  memset(&prefs, 0, sizeof prefs);
  // The content checksum lets a restore name the frame that rotted; per-block checksums add nothing to it but cost
  // about as much again, and 4 MB blocks (a piece is one block) save per-block work: -z 4.8 s to 4.2 s for 2.5 GiB.
  prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
  prefs.frameInfo.blockChecksumFlag = LZ4F_noBlockChecksum;
  prefs.frameInfo.blockSizeID = LZ4F_max4MB;
  prefs.frameInfo.contentSize = length;
  prefs.compressionLevel = level;
  return prefs;
}

// The LZ4 frame format: a little-endian magic number, then the FLG byte of the frame descriptor.
constexpr uint32_t kFrameMagic = 0x184D2204;
constexpr size_t kFlg = 4;
constexpr uint8_t kFlgDictId = 0x01, kFlgContentChecksum = 0x04, kFlgContentSize = 0x08;

uint32_t ReadLE32(const uint8_t* p) {
  return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24;
}

// liblz4 sums a frame's content with its own XXH32 at half the speed of libxxhash's (1.15 s against 0.6 s for
// 2.5 GiB here, most of -z's lz4 time on data that does not compress), so frames are made without the content
// checksum and it is added here as the frame format defines it: the C.Checksum bit in FLG, the header checksum
// byte over the frame descriptor redone, and XXH32 (seed 0) of the content after the end mark. `frame` needs 4
// bytes of room past `length`; returns the new length.
size_t AddContentChecksum(uint8_t* frame, size_t length, const uint8_t* content, size_t contentLength) {
  uint8_t flg = frame[kFlg] | kFlgContentChecksum;
  size_t descriptor = 2 + ((flg & kFlgContentSize) ? 8 : 0) + ((flg & kFlgDictId) ? 4 : 0);
  frame[kFlg] = flg;
  frame[kFlg + descriptor] = static_cast<uint8_t>((XXH32(frame + kFlg, descriptor, 0) >> 8) & 0xFF);
  XXH32_hash_t sum = XXH32(content, contentLength, 0);
  for (size_t i = 0; i < 4; i++) frame[length + i] = static_cast<uint8_t>(sum >> (8 * i));
  return length + 4;
}

// Decompression likewise: where a frame carries a content checksum, liblz4's checksum pass is skipped and
// CheckContent verifies it with libxxhash. Frames with block checksums alone are left to liblz4.
LZ4F_decompressOptions_t DecompressOptions(const uint8_t* src, size_t length, bool& checkContent) {
  checkContent = length >= 7 && ReadLE32(src) == kFrameMagic && (src[kFlg] & kFlgContentChecksum) != 0;
  LZ4F_decompressOptions_t options;
  memset(&options, 0, sizeof options);
  options.skipChecksums = checkContent ? 1 : 0;
  return options;
}

// The frame [src, src+length) ends with the XXH32 of its content; fails as liblz4 does when it does not match.
std::optional<Failure> CheckContent(const uint8_t* src, size_t length, const uint8_t* content, size_t contentLength) {
  if (XXH32(content, contentLength, 0) != ReadLE32(src + length - 4)) return Lz4Failure(static_cast<size_t>(0) - LZ4F_ERROR_contentChecksum_invalid);
  return std::nullopt;
}

using Dctx = std::unique_ptr<LZ4F_dctx, decltype(&LZ4F_freeDecompressionContext)>;

std::optional<Failure> NewDctx(Dctx& dctx) {
  LZ4F_dctx* raw = nullptr;
  size_t rc = LZ4F_createDecompressionContext(&raw, LZ4F_VERSION);
  if (LZ4F_isError(rc)) return Lz4Failure(rc);
  dctx.reset(raw);
  return std::nullopt;
}

// The rest of the frame [src, src+length) from `pos` (`rc`: liblz4's last hint) into `out`, whose length
// counts what was produced. `makeRoom(out)` runs whenever `out` is full and the frame not done: it grows `out`, or
// fails. Truncated or padded input fails; so does a content checksum that does not match.
template <typename Output, typename MakeRoom>
std::optional<Failure> DecompressRest(LZ4F_dctx* dctx, const uint8_t* src, size_t length, size_t pos, size_t rc,
                                      Output& out, MakeRoom makeRoom) {
  bool checkContent = false;
  LZ4F_decompressOptions_t options = DecompressOptions(src, length, checkContent);
  while (rc != 0) {
    size_t made = out.capacity - out.length, consumed = length - pos;
    rc = LZ4F_decompress(dctx, out.Data() + out.length, &made, src + pos, &consumed, &options);
    if (LZ4F_isError(rc)) return Lz4Failure(rc);
    out.length += made;
    pos += consumed;
    if (rc == 0) break;
    if (out.length == out.capacity) {
      std::optional<Failure> failure = makeRoom(out);
      if (failure) return failure;
    }
    if (pos == length && made == 0) return Lz4Failure("truncated LZ4 frame");
  }
  if (pos != length) return Lz4Failure("trailing data after LZ4 frame");
  if (checkContent) return CheckContent(src, length, out.Data(), out.length);
  return std::nullopt;
}

std::optional<Failure> Decompress(const uint8_t* src, size_t length, Bytes& out) {
  Dctx dctx(nullptr, LZ4F_freeDecompressionContext);
  if (std::optional<Failure> failure = NewDctx(dctx)) return failure;

  LZ4F_frameInfo_t frame;
  size_t pos = length;
  size_t rc = LZ4F_getFrameInfo(dctx.get(), &frame, src, &pos);
  if (LZ4F_isError(rc)) return Lz4Failure(rc);
  // A header's contentSize is untrusted: LZ4 cannot expand more than ~255x, so cap the first allocation.
  size_t bound = length * 256 + 65536;
  size_t initial =
      frame.contentSize ? std::min<uint64_t>(frame.contentSize, bound) : std::max<size_t>(length * 4, 65536);
  if (!out.Reserve(initial)) return Lz4Failure("out of memory");
  return DecompressRest(dctx.get(), src, length, pos, rc, out, [](Bytes& grown) -> std::optional<Failure> {
    if (!grown.Reserve(grown.capacity * 2)) return Lz4Failure("out of memory");
    return std::nullopt;
  });
}

// The caller's fixed buffer as a DecompressRest output.
struct FixedOutput {
  uint8_t* data;
  size_t capacity;
  size_t length = 0;
  uint8_t* Data() const { return data; }
};

// One whole frame into [dst, dst+capacity); `produced` gets its length. Fails when the frame holds more.
std::optional<Failure> DecompressInto(const uint8_t* src, size_t length, uint8_t* dst, size_t capacity, size_t& produced) {
  Dctx dctx(nullptr, LZ4F_freeDecompressionContext);
  if (std::optional<Failure> failure = NewDctx(dctx)) return failure;
  FixedOutput out{dst, capacity};
  std::optional<Failure> failure = DecompressRest(dctx.get(), src, length, 0, 1, out, [](FixedOutput&) {
    return std::optional<Failure>(Lz4Failure("LZ4 frame larger than its stated content size"));
  });
  produced = out.length;
  return failure;
}

// lz4DecompressInto(source, output): Promise<bytes>, one frame decompressed into the caller's (reused) buffer.
Napi::Value DecompressFrameInto(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    Napi::Buffer<uint8_t> source = ArgBuffer(info, 0, "source");
    Napi::Buffer<uint8_t> output = ArgBuffer(info, 1, "output");
    const uint8_t* src = source.Data();
    size_t length = source.Length();
    uint8_t* dst = output.Data();
    size_t capacity = output.Length();
    auto run = [=](size_t& produced) { return DecompressInto(src, length, dst, capacity, produced); };
    auto settle = [](Napi::Env env, size_t& produced) -> Napi::Value { return Napi::Number::New(env, static_cast<double>(produced)); };
    return PromiseWorker<size_t>::Start(info.Env(), run, settle, {source, output});
  });
}

// The source Buffer stays referenced while the worker reads it.
Napi::Value DecompressFrame(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    Napi::Buffer<uint8_t> source = ArgBuffer(info, 0, "source");
    const uint8_t* src = source.Data();
    size_t length = source.Length();
    auto run = [src, length](Bytes& out) { return Decompress(src, length, out); };
    return PromiseWorker<Bytes>::Start(info.Env(), run, ToBuffer, {source});
  });
}

// lz4FrameBound(length): bytes an output buffer needs for the frame of `length` source bytes.
Napi::Value FrameBound(const Napi::CallbackInfo& info) {
  uint64_t length = ArgU64(info, 0, "length");
  LZ4F_preferences_t prefs = FramePreferences(length, 0);
  return Napi::Number::New(info.Env(), static_cast<double>(LZ4F_compressFrameBound(length, &prefs)));
}

// The frame's length, and its sums: the adler32 of the frame, the digest of the source.
struct CompressedPiece {
  size_t length = 0;
  PieceSums sums;
};

// lz4CompressPiece(source, level, output, digest?): Promise<{ length, adler32, digest? }>. One worker task writes
// the frame into the caller's (reused) `output` and sums it while it is in the cache: the frame's adler32, and the
// digest of the source bytes when asked. No allocation per piece, so no page faults and no GC pressure from it.
Napi::Value CompressPiece(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    Napi::Buffer<uint8_t> source = ArgBuffer(info, 0, "source");
    int level = ArgI32(info, 1, "level");
    Napi::Buffer<uint8_t> output = ArgBuffer(info, 2, "output");
    Digest digest = ArgDigest(info, 3);
    const uint8_t* src = source.Data();
    size_t length = source.Length();
    uint8_t* dst = output.Data();
    size_t capacity = output.Length();
    LZ4F_preferences_t prefs = FramePreferences(length, level);
    if (capacity < LZ4F_compressFrameBound(length, &prefs)) BadArg(info, "output", "at least lz4FrameBound(source.length) bytes");
    auto run = [=](CompressedPiece& piece) -> std::optional<Failure> {
      if (digest != Digest::kNone) {
        std::optional<Failure> failure = ComputeSums(src, length, digest, false, piece.sums);
        if (failure) return failure;
      }
      LZ4F_preferences_t body = prefs;
      body.frameInfo.contentChecksumFlag = LZ4F_noContentChecksum;
      size_t written = LZ4F_compressFrame(dst, capacity - 4, src, length, &body);
      if (LZ4F_isError(written)) return Lz4Failure(written);
      written = AddContentChecksum(dst, written, src, length);
      piece.length = written;
      piece.sums.adler = FastAdler32(1, dst, written);
      return std::nullopt;
    };
    auto settle = [](Napi::Env env, CompressedPiece& piece) -> Napi::Value {
      Napi::Object out = SumsToObject(env, piece.sums).As<Napi::Object>();
      out.Set("length", Napi::Number::New(env, static_cast<double>(piece.length)));
      return out;
    };
    return PromiseWorker<CompressedPiece>::Start(info.Env(), run, settle, {source, output});
  });
}

}  // namespace

void InitLz4(Napi::Env env, Napi::Object exports) {
  exports.Set("lz4FrameBound", Napi::Function::New(env, FrameBound, "lz4FrameBound"));
  exports.Set("lz4CompressPiece", Napi::Function::New(env, CompressPiece, "lz4CompressPiece"));
  exports.Set("lz4DecompressFrame", Napi::Function::New(env, DecompressFrame, "lz4DecompressFrame"));
  exports.Set("lz4DecompressInto", Napi::Function::New(env, DecompressFrameInto, "lz4DecompressInto"));
}

}  // namespace virtnbd
