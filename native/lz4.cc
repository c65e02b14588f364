// One LZ4 frame per call (content checksum on, independent 4 MB blocks) into the caller's buffer, summed in the
// same task, with the blocks that do not compress left in the source (never copied); decompression rejects
// corrupt, truncated or padded input. Content checksums are XXH32 from libxxhash.
#include "lz4.h"

// For the LZ4F_errorCodes enum (a content checksum mismatch found here is reported as liblz4 would).
#define LZ4F_STATIC_LINKING_ONLY
#include <lz4.h>
#include <lz4frame.h>
#include <lz4hc.h>
// For XXH32_state_t on the stack.
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>
#include <zlib.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

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

// The most bytes the frame of `length` source bytes can take (the frames written here never take more).
size_t MaxFrameLength(size_t length) {
  LZ4F_preferences_t prefs;
  memset(&prefs, 0, sizeof prefs);
  prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
  prefs.frameInfo.blockSizeID = LZ4F_max4MB;
  prefs.frameInfo.contentSize = length;
  return LZ4F_compressFrameBound(length, &prefs);
}

// The LZ4 frame format: a little-endian magic number, then the FLG byte of the frame descriptor.
constexpr uint32_t kFrameMagic = 0x184D2204;
constexpr size_t kFlg = 4;
constexpr uint8_t kFlgContentChecksum = 0x04, kFlgContentSize = 0x08;

uint32_t ReadLE32(const uint8_t* p) {
  return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24;
}

void WriteLE32(uint8_t* p, uint32_t value) {
  for (size_t i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(value >> (8 * i));
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
  return Napi::Number::New(info.Env(), static_cast<double>(MaxFrameLength(length)));
}

// Frames are written here rather than by LZ4F_compressFrame, which copies a block that does not compress into the
// frame: such a block stays in the source and the frame lists it as a segment (-z copy of 2.5 GiB of random
// data: 3.6-3.8 s to 3.0-3.2 s, 4.6 to 3.6 CPU-s). The frame is what liblz4 would write but for the B.Indep bit:
// version 01, independent blocks, content size, content checksum (libxxhash's XXH32 runs at twice the speed of
// liblz4's own), 4 MB blocks, so a piece of up to 4 MiB is one block (fewer blocks, less work: -z 4.8 s to 4.2 s
// for 2.5 GiB); a block is stored when it would not shrink, as liblz4 decides. No block checksums: the content
// checksum lets a restore name the frame that rotted, and per-block ones would cost about as much again.
constexpr uint8_t kFlgVersion = 0x40, kFlgBlockIndependent = 0x20;
constexpr uint8_t kBd4MB = 7 << 4;
constexpr size_t kMaxBlock = 4 * 1024 * 1024;
constexpr uint32_t kStoredBlock = 0x80000000u;
// A stored block's content checksum and adler32 run slice by slice, so the second pass finds it in the cache.
constexpr size_t kSumSlice = 128 * 1024;

// The frame descriptor at `dst`; returns its length (15 bytes with a content size, 7 without).
size_t WriteFrameHeader(uint8_t* dst, uint64_t contentSize) {
  WriteLE32(dst, kFrameMagic);
  size_t pos = kFlg;
  dst[pos++] = kFlgVersion | kFlgBlockIndependent | kFlgContentChecksum | (contentSize ? kFlgContentSize : 0);
  dst[pos++] = kBd4MB;
  if (contentSize) {
    for (size_t i = 0; i < 8; i++) dst[pos++] = static_cast<uint8_t>(contentSize >> (8 * i));
  }
  dst[pos] = static_cast<uint8_t>((XXH32(dst + kFlg, pos - kFlg, 0) >> 8) & 0xFF);
  return pos + 1;
}

// One block into `dst` (at most `capacity` bytes) as liblz4's frame API compresses it at `level`: fast below
// LZ4HC_CLEVEL_MIN (a negative level is acceleration), HC from there. 0 when it does not fit or fails.
int CompressBlock(const uint8_t* src, size_t length, uint8_t* dst, size_t capacity, int level) {
  const char* in = reinterpret_cast<const char*>(src);
  char* out = reinterpret_cast<char*>(dst);
  if (level < LZ4HC_CLEVEL_MIN) {
    thread_local std::unique_ptr<void, decltype(&free)> state(malloc(LZ4_sizeofState()), free);
    if (!state) return 0;
    return LZ4_compress_fast_extState(state.get(), in, out, static_cast<int>(length), static_cast<int>(capacity), level < 0 ? 1 - level : 1);
  }
  thread_local std::unique_ptr<void, decltype(&free)> state(malloc(LZ4_sizeofStateHC()), free);
  if (!state) return 0;
  return LZ4_compress_HC_extStateHC(state.get(), in, out, static_cast<int>(length), static_cast<int>(capacity), level);
}

// A run of the frame, in order: bytes of the output buffer, or a stored block's bytes in the source; its adler32.
struct FrameSegment {
  bool inSource = false;
  size_t start = 0, end = 0;
  uint32_t adler = 1;
};

// The frame (its segments and length) and the sums: the frame's adler32, the source's digest.
struct CompressedPiece {
  size_t length = 0;
  std::vector<FrameSegment> segments;
  PieceSums sums;
};

// The frame of [src, src+length) at `level`: its own bytes into `dst`, which holds at least lz4FrameBound(length).
void CompressFrame(const uint8_t* src, size_t length, int level, uint8_t* dst, CompressedPiece& piece) {
  XXH32_state_t content;
  XXH32_reset(&content, 0);
  size_t pos = WriteFrameHeader(dst, length), outputStart = 0;
  piece.sums.adler = 1;
  auto add = [&piece](FrameSegment segment) {
    piece.sums.adler = adler32_combine(piece.sums.adler, segment.adler, static_cast<z_off_t>(segment.end - segment.start));
    piece.length += segment.end - segment.start;
    piece.segments.push_back(segment);
  };
  auto endOutput = [&] {
    add({false, outputStart, pos, FastAdler32(1, dst + outputStart, pos - outputStart)});
    outputStart = pos;
  };
  for (size_t offset = 0; offset < length; offset += kMaxBlock) {
    size_t block = std::min(kMaxBlock, length - offset);
    int made = CompressBlock(src + offset, block, dst + pos + 4, block - 1, level);
    if (made > 0) {
      WriteLE32(dst + pos, static_cast<uint32_t>(made));
      pos += 4 + made;
      XXH32_update(&content, src + offset, block);
      continue;
    }
    WriteLE32(dst + pos, static_cast<uint32_t>(block) | kStoredBlock);
    pos += 4;
    endOutput();
    FrameSegment stored{true, offset, offset + block, 1};
    for (size_t at = offset; at < offset + block; at += kSumSlice) {
      size_t slice = std::min(kSumSlice, offset + block - at);
      XXH32_update(&content, src + at, slice);
      stored.adler = FastAdler32(stored.adler, src + at, slice);
    }
    add(stored);
  }
  WriteLE32(dst + pos, 0);
  WriteLE32(dst + pos + 4, XXH32_digest(&content));
  pos += 8;
  endOutput();
}

// lz4CompressPiece(source, level, output, digest?): Promise<{ length, adler32, segments, digest? }>. One worker
// task writes the frame into the caller's (reused) `output`, but for the blocks that do not compress, which stay in
// `source`: `segments` lists the frame's runs in order ({ inSource, start, end, adler32 }). Sums while the bytes are
// in the cache: each run's adler32 and the whole frame's, and the digest of the source bytes when asked. No
// allocation per piece, so no page faults and no GC pressure from it.
Napi::Value CompressPiece(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    Napi::Buffer<uint8_t> source = ArgBuffer(info, 0, "source");
    int level = ArgI32(info, 1, "level");
    Napi::Buffer<uint8_t> output = ArgBuffer(info, 2, "output");
    Digest digest = ArgDigest(info, 3);
    const uint8_t* src = source.Data();
    size_t length = source.Length();
    uint8_t* dst = output.Data();
    if (output.Length() < MaxFrameLength(length)) BadArg(info, "output", "at least lz4FrameBound(source.length) bytes");
    auto run = [=](CompressedPiece& piece) -> std::optional<Failure> {
      if (digest != Digest::kNone) {
        std::optional<Failure> failure = ComputeSums(src, length, digest, false, piece.sums);
        if (failure) return failure;
      }
      CompressFrame(src, length, level, dst, piece);
      return std::nullopt;
    };
    auto settle = [](Napi::Env env, CompressedPiece& piece) -> Napi::Value {
      Napi::Object out = SumsToObject(env, piece.sums).As<Napi::Object>();
      out.Set("length", Napi::Number::New(env, static_cast<double>(piece.length)));
      Napi::Array segments = Napi::Array::New(env, piece.segments.size());
      for (size_t i = 0; i < piece.segments.size(); i++) {
        const FrameSegment& s = piece.segments[i];
        Napi::Object segment = Napi::Object::New(env);
        segment.Set("inSource", Napi::Boolean::New(env, s.inSource));
        segment.Set("start", Napi::Number::New(env, static_cast<double>(s.start)));
        segment.Set("end", Napi::Number::New(env, static_cast<double>(s.end)));
        segment.Set("adler32", Napi::Number::New(env, static_cast<double>(s.adler)));
        segments.Set(static_cast<uint32_t>(i), segment);
      }
      out.Set("segments", segments);
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
