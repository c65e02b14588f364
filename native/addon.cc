// Module entry: registers NbdHandle, libvirt and lz4 bindings, plus adler32, alignedBuffer, copyInto, readAhead and versions().
#include <libnbd.h>
#include <libvirt/libvirt.h>
#include <lz4.h>
#include <napi.h>
#include <fcntl.h>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "adler32.h"
#include "args.h"
#include "async.h"
#include "libvirt.h"
#include "lz4.h"
#include "checksum.h"
#include "external.h"
#include "nbd_handle.h"

namespace virtnbd {

namespace {

// CPU only, so synchronous; the length is a size_t, so buffers above 4 GiB need no chunking.
Napi::Value Adler32(const Napi::CallbackInfo& info) {
  Napi::Buffer<uint8_t> buffer = ArgBuffer(info, 0, "buffer");
  uint32_t start = ArgU32(info, 1, "start");
  return Napi::Number::New(info.Env(), static_cast<double>(FastAdler32(start, buffer.Data(), buffer.Length())));
}

// nbd_get_version needs a handle; nbd_create/nbd_close are local (no connection is made).
std::string LibnbdVersion() {
  nbd_handle* h = nbd_create();
  if (!h) return "unknown";
  const char* version = nbd_get_version(h);
  std::string out = version ? version : "unknown";
  nbd_close(h);
  return out;
}

std::string LibvirtVersion() {
  unsigned long version = 0;
  if (virGetVersion(&version, nullptr, nullptr) < 0) return "unknown";
  return std::to_string(version / 1000000) + "." + std::to_string(version / 1000 % 1000) + "." +
         std::to_string(version % 1000);
}

// A fresh anonymous mapping of `size` bytes (rounded up to whole huge pages) on a `boundary` of at least a huge page,
// asked for transparent huge pages before any page of it is touched, then faulted in (zeroed). Memory that malloc
// recycles may already be in as 4 KiB pages, which the hint would not change, so this never comes from malloc.
Napi::Value HugePageBuffer(const Napi::CallbackInfo& info, uint64_t size, uint64_t alignment) {
  constexpr uint64_t kHugePage = 2 * 1024 * 1024;
  const uint64_t boundary = alignment > kHugePage ? alignment : kHugePage;
  const uint64_t body = (size + kHugePage - 1) / kHugePage * kHugePage;
  const uint64_t mapped = body + boundary;
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) throw Napi::Error::New(info.Env(), "out of memory");
  const uintptr_t start = (reinterpret_cast<uintptr_t>(base) + boundary - 1) / boundary * boundary;
  const uint64_t head = start - reinterpret_cast<uintptr_t>(base);
  if (head > 0) munmap(base, head);
  if (mapped - head - body > 0) munmap(reinterpret_cast<void*>(start + body), mapped - head - body);
  uint8_t* data = reinterpret_cast<uint8_t*>(start);
  madvise(data, body, MADV_HUGEPAGE);  // only a hint: without THP the buffer works the same
  std::memset(data, 0, body);
  return ExternalBuffer(info.Env(), data, size, body, [body](uint8_t* p) { munmap(p, body); });
}

// alignedBuffer(size, alignment, hugePages?): zeroed memory on an `alignment` boundary, as O_DIRECT writes need.
// With hugePages, on transparent huge pages where the kernel has them: a direct write from 4 KiB pages reaches the
// disk as requests of at most max_segments pages (about 0.7 MiB on virtio-blk), from 2 MiB pages as one request of
// the whole chunk.
Napi::Value AlignedBuffer(const Napi::CallbackInfo& info) {
  uint64_t size = ArgU64(info, 0, "size");
  uint64_t alignment = ArgU64(info, 1, "alignment");
  bool hugePages = info.Length() > 2 && !info[2].IsUndefined() && ArgBool(info, 2, "hugePages");
  if (alignment < sizeof(void*) || (alignment & (alignment - 1)) != 0) BadArg(info, "alignment", "a power of two of at least 8");
  if (hugePages && size > 0) return HugePageBuffer(info, size, alignment);
  void* data = nullptr;
  if (posix_memalign(&data, alignment, size == 0 ? alignment : size) != 0) throw Napi::Error::New(info.Env(), "out of memory");
  std::memset(data, 0, size);
  return ExternalBuffer(info.Env(), static_cast<uint8_t*>(data), size, size);
}

// copyInto(target, at, sources): Promise<void>. Copies the sources one after another into target[at, ...) on a
// worker thread, so the event loop does not spend itself on bulk copies into a direct sink's staging chunks.
Napi::Value CopyInto(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    Napi::Buffer<uint8_t> target = ArgBuffer(info, 0, "target");
    uint64_t at = ArgU64(info, 1, "at");
    if (!info[2].IsArray()) BadArg(info, "sources", "an array of Buffers");
    Napi::Array list = info[2].As<Napi::Array>();
    std::vector<Napi::Object> keep{target};
    std::vector<std::pair<const uint8_t*, size_t>> runs;
    uint64_t total = 0;
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value item = list.Get(i);
      if (!item.IsBuffer()) BadArg(info, "sources", "an array of Buffers");
      Napi::Buffer<uint8_t> source = item.As<Napi::Buffer<uint8_t>>();
      keep.push_back(source);
      runs.emplace_back(source.Data(), source.Length());
      total += source.Length();
    }
    if (at > target.Length() || total > target.Length() - at) BadArg(info, "sources", "bytes that fit in target from at");
    uint8_t* dst = target.Data() + at;
    auto run = [dst, runs](Unit&) -> std::optional<Failure> {
      uint8_t* out = dst;
      for (const auto& [data, length] : runs) {
        std::memcpy(out, data, length);
        out += length;
      }
      return std::nullopt;
    };
    return PromiseWorker<Unit>::Start(info.Env(), run, PromiseWorker<Unit>::Undefined, keep);
  });
}

// readAhead(fd, offset, length): Promise<void>. Asks the kernel to read [offset, offset+length) of the file into
// the page cache (POSIX_FADV_WILLNEED) while the caller works on what it read before; on a worker thread, since
// starting the reads can wait on the device's queue. Linux reads at most the device's readahead or request size
// per call (8 MiB of 20 asked here; 128 KiB to a few MiB on common disks), so the range goes in small steps.
// Only a hint: failures are ignored, the caller reads anyway.
Napi::Value ReadAhead(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    int fd = static_cast<int>(ArgU32(info, 0, "fd"));
    uint64_t offset = ArgU64(info, 1, "offset");
    uint64_t length = ArgU64(info, 2, "length");
    auto run = [fd, offset, length](Unit&) -> std::optional<Failure> {
      constexpr uint64_t kStep = 512 * 1024;
      for (uint64_t at = offset; at < offset + length; at += kStep) {
        uint64_t n = std::min(kStep, offset + length - at);
        if (posix_fadvise(fd, static_cast<off_t>(at), static_cast<off_t>(n), POSIX_FADV_WILLNEED) != 0) break;
      }
      return std::nullopt;
    };
    return PromiseWorker<Unit>::Start(info.Env(), run);
  });
}

// exitNow(code): ends the process at once. process.exit first joins libuv's threads, and one blocked in a libvirt or
// libnbd call to a QEMU that stopped answering would hold the exit as long as QEMU does.
Napi::Value ExitNow(const Napi::CallbackInfo& info) {
  _exit(info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1);
}

Napi::Value Versions(const Napi::CallbackInfo& info) {
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("libnbd", LibnbdVersion());
  out.Set("libvirt", LibvirtVersion());
  out.Set("lz4", LZ4_versionString());
  out.Set("zlib", zlibVersion());
  return out;
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  // glibc gives each of the 16 pool threads its own malloc arena, and lz4 frames freed on one thread after being
  // made on another pile up there: two arenas keep -z within its memory target at no measured cost.
  mallopt(M_ARENA_MAX, 2);
  exports.Set("NbdHandle", NbdHandle::Define(env));
  InitLibvirt(env, exports);
  InitLz4(env, exports);
  InitChecksum(env, exports);
  exports.Set("adler32", Napi::Function::New(env, Adler32, "adler32"));
  exports.Set("alignedBuffer", Napi::Function::New(env, AlignedBuffer, "alignedBuffer"));
  exports.Set("copyInto", Napi::Function::New(env, CopyInto, "copyInto"));
  exports.Set("readAhead", Napi::Function::New(env, ReadAhead, "readAhead"));
  exports.Set("versions", Napi::Function::New(env, Versions, "versions"));
  exports.Set("exitNow", Napi::Function::New(env, ExitNow, "exitNow"));
  return exports;
}

}  // namespace virtnbd

// NODE_API_MODULE pastes the name into an identifier, so it needs an unqualified one.
static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return virtnbd::Init(env, exports); }

NODE_API_MODULE(virtnbd_native, InitModule)
