// NbdHandle over libnbd: all I/O on workers, errors carry the worker thread's libnbd error; getters use a snapshot.
#include "nbd_handle.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "args.h"
#include "checksum.h"

namespace virtnbd {

namespace {

// Read on the thread where the libnbd call failed: the error is thread-local.
Failure NbdFailure() {
  const char* message = nbd_get_error();
  return {message ? message : "unknown libnbd error", nbd_get_errno(), "libnbd"};
}

// libnbd refuses payloads above 64 MiB and qemu-nbd advertises 32 MiB, so big buffers go in pieces.
constexpr uint64_t kMaxPayload = 32u << 20;
// Zero/trim/block-status lengths are 32-bit on the wire; stay well aligned below that.
constexpr uint64_t kMaxNoPayload = 1u << 30;
constexpr uint64_t kMaxStatus = 0xFFF00000u;

// Waits for command `cookie` as libnbd's blocking calls do: kDone, kFailed (retired with its error) or kStuck (the
// poll failed and the command is not retired). libnbd takes a cookie it does not know for one still in flight, so
// a retired cookie must never be waited for again.
enum class Await { kDone, kFailed, kStuck };
Await AwaitCommand(nbd_handle* h, int64_t cookie) {
  for (;;) {
    int done = nbd_aio_command_completed(h, cookie);
    if (done == 1) return Await::kDone;
    if (done == -1) return Await::kFailed;
    if (nbd_poll(h, -1) == -1) return Await::kStuck;
  }
}

// Requests a pipelined read keeps in flight beyond the slice being summed. Four connections with two 256 KiB
// requests each keep QEMU's request buffers below the line where its heap gives them back (see READ_REQUEST_SIZE
// in endpoint.ts): 0 to 300 page faults a run; three each cost 17 000 to 28 000 on some domains (once 386 000),
// and copied no sooner.
constexpr uint64_t kReadsAhead = 1;

// Reads [offset, offset+length) into data in requests of `request` bytes, kReadsAhead of them sent ahead, and
// calls arrived(pos, n) for each slice in order once it is in. On a failure, waits out the requests still in
// flight (they write into data) and returns the first failure. The caller holds the handle alone (serial_).
std::optional<Failure> PipelinedRead(nbd_handle* h, uint8_t* data, uint64_t length, uint64_t offset, uint64_t request,
                                     const std::function<void(uint64_t pos, uint64_t n)>& arrived) {
  uint64_t count = (length + request - 1) / request;
  std::vector<int64_t> cookies;
  cookies.reserve(count);
  uint64_t retired = 0;
  std::optional<Failure> failed;
  while (retired < count) {
    while (cookies.size() < count && cookies.size() <= retired + kReadsAhead) {
      uint64_t pos = cookies.size() * request;
      int64_t cookie = nbd_aio_pread(h, data + pos, std::min(request, length - pos), offset + pos, NBD_NULL_COMPLETION, 0);
      if (cookie == -1) break;
      cookies.push_back(cookie);
    }
    if (cookies.size() == retired) {  // nothing in flight: the send failed
      failed = NbdFailure();
      break;
    }
    Await outcome = AwaitCommand(h, cookies[retired]);
    if (outcome != Await::kDone) {
      failed = NbdFailure();
      if (outcome == Await::kFailed) retired++;
      break;
    }
    uint64_t pos = retired * request;
    arrived(pos, std::min(request, length - pos));
    retired++;
  }
  if (failed) {
    // Retires the requests still in flight: answered, failed, or dropped once the connection is dead.
    for (; retired < cookies.size(); retired++) {
      if (AwaitCommand(h, cookies[retired]) == Await::kStuck) break;
    }
  }
  return failed;
}

// Splits [0, length) into requests of at most `max` bytes; stops at the first failure.
int Chunked(uint64_t length, uint64_t max, const std::function<int(uint64_t pos, uint64_t count)>& request) {
  for (uint64_t pos = 0; pos < length; pos += max) {
    if (request(pos, std::min(max, length - pos)) == -1) return -1;
  }
  return 0;
}

struct ExtentSink {
  const std::string* context;
  std::vector<uint32_t>* out;
};

// Keeps only the requested context's (length, flags) pairs; other negotiated contexts are ignored.
int CollectExtents(void* user, const char* metacontext, uint64_t, uint32_t* entries, size_t count, int*) {
  auto* sink = static_cast<ExtentSink*>(user);
  if (*sink->context == metacontext) sink->out->insert(sink->out->end(), entries, entries + count);
  return 0;
}

}  // namespace

void SocketCutter::Adopt(int socket) {
  if (socket < 0) return;
  int dup = fcntl(socket, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return;
  int old = fd_.exchange(dup);
  if (old >= 0) ::close(old);
  if (cut_) ::shutdown(dup, SHUT_RDWR);
}

bool SocketCutter::Cut() {
  cut_ = true;
  int fd = fd_.load();
  if (fd < 0) return false;
  ::shutdown(fd, SHUT_RDWR);
  return true;
}

void SocketCutter::Release() {
  int fd = fd_.exchange(-1);
  if (fd >= 0) ::close(fd);
}

Napi::Function NbdHandle::Define(Napi::Env env) {
  return DefineClass(env, "NbdHandle",
                     {
                         InstanceMethod<&NbdHandle::ConnectUnix>("connectUnix"),
                         InstanceMethod<&NbdHandle::ConnectUri>("connectUri"),
                         InstanceMethod<&NbdHandle::Get<&NbdInfo::size>>("getSize"),
                         InstanceMethod<&NbdHandle::Get<&NbdInfo::maxBlock>>("getMaxBlockSize"),
                         InstanceMethod<&NbdHandle::Get<&NbdInfo::multiConn>>("canMultiConn"),
                         InstanceMethod<&NbdHandle::Get<&NbdInfo::readOnly>>("isReadOnly"),
                         InstanceMethod<&NbdHandle::Get<&NbdInfo::canZero>>("canZero"),
                         InstanceMethod<&NbdHandle::Get<&NbdInfo::canFlush>>("canFlush"),
                         InstanceMethod<&NbdHandle::Get<&NbdInfo::canTrim>>("canTrim"),
                         InstanceMethod<&NbdHandle::CanMetaContext>("canMetaContext"),
                         InstanceMethod<&NbdHandle::BlockStatus>("blockStatus"),
                         InstanceMethod<&NbdHandle::Pread>("pread"),
                         InstanceMethod<&NbdHandle::PreadSummed>("preadSummed"),
                         InstanceMethod<&NbdHandle::Pwrite>("pwrite"),
                         InstanceMethod<&NbdHandle::Zero>("zero"),
                         InstanceMethod<&NbdHandle::Trim>("trim"),
                         InstanceMethod<&NbdHandle::Flush>("flush"),
                         InstanceMethod<&NbdHandle::Close>("close"),
                         InstanceMethod<&NbdHandle::Cut>("cut"),
                     });
}

// nbd_create only allocates; the destructor's fallback nbd_close is local too (no NBD_CMD_DISC round trip).
NbdHandle::NbdHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NbdHandle>(info) {
  nbd_handle* h = nbd_create();
  if (!h) throw MakeError(info.Env(), NbdFailure());
  // Every pread buffer is either filled by the server or discarded on error, so libnbd's memset is wasted work.
  nbd_set_pread_initialize(h, false);
  handle_ = Handle(h, [cutter = cutter_](nbd_handle* closing) {
    nbd_close(closing);
    cutter->Release();
  });
}

template <typename T>
Napi::Value NbdHandle::SubmitChecked(const Napi::CallbackInfo& info, std::function<std::optional<Failure>(nbd_handle*, T&)> op,
                                     typename PromiseWorker<T>::Settle settle, std::optional<Napi::Object> buffer) {
  if (!handle_) throw Napi::Error::New(info.Env(), "NBD handle is closed");
  Handle handle = handle_;
  auto run = [handle, serial = serial_, op](T& out) -> std::optional<Failure> {
    std::lock_guard<std::mutex> one(*serial);
    return op(handle.get(), out);
  };
  std::vector<Napi::Object> keep{Value()};
  if (buffer) keep.push_back(*buffer);
  return PromiseWorker<T>::Start(info.Env(), run, settle, std::move(keep));
}

template <typename T>
Napi::Value NbdHandle::Submit(const Napi::CallbackInfo& info, std::function<int(nbd_handle*, T&)> op,
                              typename PromiseWorker<T>::Settle settle, std::optional<Napi::Object> buffer) {
  auto checked = [op](nbd_handle* h, T& out) -> std::optional<Failure> {
    if (op(h, out) == -1) return NbdFailure();
    return std::nullopt;
  };
  return SubmitChecked<T>(info, checked, settle, buffer);
}

Napi::Value NbdHandle::Submit(const Napi::CallbackInfo& info, Op op, std::optional<Napi::Object> buffer) {
  return Submit<Unit>(info, [op](nbd_handle* h, Unit&) { return op(h); }, PromiseWorker<Unit>::Undefined, buffer);
}

// `connect` starts an nbd_aio_connect_*; the socket is handed to the cutter before the handshake is awaited, so
// that a server that accepts but never answers can be cut too.
Napi::Value NbdHandle::Connect(const Napi::CallbackInfo& info, std::vector<std::string> contexts, Op connect) {
  auto op = [contexts, connect, cutter = cutter_](nbd_handle* h, NbdInfo& out) {
    for (const std::string& context : contexts) {
      if (nbd_add_meta_context(h, context.c_str()) == -1) return -1;
    }
    if (connect(h) == -1) return -1;
    cutter->Adopt(nbd_aio_get_fd(h));
    while (nbd_aio_is_connecting(h) == 1) {
      if (nbd_poll(h, -1) == -1) return -1;
    }
    if (nbd_aio_is_ready(h) != 1) {
      // Dead or closed without an error of its own (the server hung up): a pread tells the state's error.
      char probe;
      if (nbd_pread(h, &probe, 1, 0, 0) == -1) return -1;
    }
    out.size = nbd_get_size(h);
    out.maxBlock = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    if (out.size < 0 || out.maxBlock < 0) return -1;
    out.multiConn = nbd_can_multi_conn(h) == 1;
    out.readOnly = nbd_is_read_only(h) == 1;
    out.canZero = nbd_can_zero(h) == 1;
    out.canFlush = nbd_can_flush(h) == 1;
    out.canTrim = nbd_can_trim(h) == 1;
    for (const std::string& context : contexts) {
      out.metaContexts.emplace_back(context, nbd_can_meta_context(h, context.c_str()) == 1);
    }
    return 0;
  };
  auto settle = [this](Napi::Env env, NbdInfo& out) -> Napi::Value {
    info_ = std::move(out);
    return env.Undefined();
  };
  return Submit<NbdInfo>(info, op, settle);
}

Napi::Value NbdHandle::ConnectUnix(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string socket = ArgString(info, 0, "socketPath");
    std::string exportName = ArgString(info, 1, "exportName");
    return Connect(info, ArgStrings(info, 2, "metaContexts"), [socket, exportName](nbd_handle* h) {
      if (nbd_set_export_name(h, exportName.c_str()) == -1) return -1;
      return nbd_aio_connect_unix(h, socket.c_str());
    });
  });
}

// connectUri(uri, metaContexts, tlsCertificates?): with a certificates directory (ca-cert.pem, client-cert.pem,
// client-key.pem), TLS is required and the server's certificate checked against that CA.
Napi::Value NbdHandle::ConnectUri(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string uri = ArgString(info, 0, "uri");
    std::optional<std::string> certificates = ArgOptString(info, 2, "tlsCertificates");
    return Connect(info, ArgStrings(info, 1, "metaContexts"), [uri, certificates](nbd_handle* h) {
      if (certificates && (nbd_set_tls(h, LIBNBD_TLS_REQUIRE) == -1 || nbd_set_tls_certificates(h, certificates->c_str()) == -1)) return -1;
      return nbd_aio_connect_uri(h, uri.c_str());
    });
  });
}

const NbdInfo& NbdHandle::Connected(const Napi::CallbackInfo& info) const {
  if (!info_) throw Napi::Error::New(info.Env(), "NBD handle is not connected");
  return *info_;
}

// Largest pread/pwrite request: the server's maximum when it states one, capped at kMaxPayload.
uint64_t NbdHandle::PayloadChunk() const {
  if (info_ && info_->maxBlock > 0) return std::min<uint64_t>(info_->maxBlock, kMaxPayload);
  return kMaxPayload;
}

template <auto Field>
Napi::Value NbdHandle::Get(const Napi::CallbackInfo& info) {
  auto value = Connected(info).*Field;
  if constexpr (std::is_same_v<decltype(value), bool>) return Napi::Boolean::New(info.Env(), value);
  else return Napi::Number::New(info.Env(), static_cast<double>(value));
}

// Only contexts requested at connect time can have been agreed; anything else is false.
Napi::Value NbdHandle::CanMetaContext(const Napi::CallbackInfo& info) {
  std::string name = ArgString(info, 0, "name");
  for (const auto& [context, agreed] : Connected(info).metaContexts) {
    if (context == name) return Napi::Boolean::New(info.Env(), agreed);
  }
  return Napi::Boolean::New(info.Env(), false);
}

Napi::Value NbdHandle::BlockStatus(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    uint64_t offset = ArgU64(info, 0, "offset");
    uint64_t length = std::min(ArgU64(info, 1, "length"), kMaxStatus);
    std::string context = ArgString(info, 2, "context");
    auto op = [offset, length, context](nbd_handle* h, std::vector<uint32_t>& out) {
      ExtentSink sink{&context, &out};
      return nbd_block_status(h, length, offset, nbd_extent_callback{CollectExtents, &sink, nullptr}, 0);
    };
    auto settle = [](Napi::Env env, std::vector<uint32_t>& out) -> Napi::Value {
      Napi::Array array = Napi::Array::New(env, out.size());
      for (size_t k = 0; k < out.size(); k++) array.Set(static_cast<uint32_t>(k), Napi::Number::New(env, out[k]));
      return array;
    };
    return Submit<std::vector<uint32_t>>(info, op, settle);
  });
}

Napi::Value NbdHandle::BufferIo(const Napi::CallbackInfo& info, Transfer transfer) {
  return AsPromise(info.Env(), [&] {
    Napi::Buffer<uint8_t> buffer = ArgBuffer(info, 0, "buffer");
    uint64_t offset = ArgU64(info, 1, "offset");
    uint8_t* data = buffer.Data();
    uint64_t length = buffer.Length(), chunk = PayloadChunk();
    auto op = [=](nbd_handle* h) {
      return Chunked(length, chunk, [&](uint64_t pos, uint64_t n) { return transfer(h, data + pos, n, offset + pos); });
    };
    return Submit(info, op, buffer);
  });
}

Napi::Value NbdHandle::Pread(const Napi::CallbackInfo& info) {
  return BufferIo(info, [](nbd_handle* h, uint8_t* p, uint64_t n, uint64_t at) { return nbd_pread(h, p, n, at, 0); });
}

// preadSummed(buffer, offset, requestSize, withAdler, digest?): reads the buffer in requests of requestSize with
// kReadsAhead more in flight, and sums each slice on this worker as soon as it arrives, while the server sends the
// next: the adler32 (from 1; left at 1 without `withAdler`) and, with `digest` ('blake3'), the digest (hex) of
// the whole buffer. One task per piece in place of a task per request plus one for the sums halved the context
// switches and saved about 0.3 CPU-s per 2.5 GiB; the request ahead made a full copy of 2.5 GiB 5 to 10 % sooner
// (measured 2026-11-29 against one request at a time, summed in between).
Napi::Value NbdHandle::PreadSummed(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    Napi::Buffer<uint8_t> buffer = ArgBuffer(info, 0, "buffer");
    uint64_t offset = ArgU64(info, 1, "offset");
    uint64_t request = std::min(ArgU64(info, 2, "requestSize"), PayloadChunk());
    if (request == 0) BadArg(info, "requestSize", "a positive integer");
    bool withAdler = ArgBool(info, 3, "withAdler");
    Digest digest = ArgDigest(info, 4);
    if (digest == Digest::kSha256) BadArg(info, "digest", "'blake3' or undefined");
    uint8_t* data = buffer.Data();
    uint64_t length = buffer.Length();
    auto op = [=](nbd_handle* h, PieceSums& sums) -> std::optional<Failure> {
      PieceSummer summer(digest, withAdler);
      std::optional<Failure> failed = PipelinedRead(h, data, length, offset, request, [&](uint64_t pos, uint64_t n) {
        summer.Update(data + pos, n);
      });
      if (failed) return failed;
      return summer.Finish(sums);  // BLAKE3 or none: nothing that can fail
    };
    return SubmitChecked<PieceSums>(info, op, SumsToObject, buffer);
  });
}

Napi::Value NbdHandle::Pwrite(const Napi::CallbackInfo& info) {
  return BufferIo(info, [](nbd_handle* h, uint8_t* p, uint64_t n, uint64_t at) { return nbd_pwrite(h, p, n, at, 0); });
}

Napi::Value NbdHandle::RangeIo(const Napi::CallbackInfo& info, uint64_t offset, uint64_t length,
                               int (*request)(nbd_handle*, uint64_t, uint64_t, uint32_t), uint32_t flags) {
  auto op = [=](nbd_handle* h) {
    return Chunked(length, kMaxNoPayload, [&](uint64_t pos, uint64_t n) { return request(h, n, offset + pos, flags); });
  };
  return Submit(info, op);
}

Napi::Value NbdHandle::Zero(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    uint64_t offset = ArgU64(info, 0, "offset"), length = ArgU64(info, 1, "length");
    return RangeIo(info, offset, length, nbd_zero, ArgBool(info, 2, "allowTrim") ? 0 : LIBNBD_CMD_FLAG_NO_HOLE);
  });
}

Napi::Value NbdHandle::Trim(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    uint64_t offset = ArgU64(info, 0, "offset"), length = ArgU64(info, 1, "length");
    return RangeIo(info, offset, length, nbd_trim, 0);
  });
}

Napi::Value NbdHandle::Flush(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] { return Submit(info, [](nbd_handle* h) { return nbd_flush(h, 0); }); });
}

// Idempotent: the first call takes the handle; NBD_CMD_DISC is best effort, nbd_close follows when the last
// in-flight worker lets go (normally right here on this worker).
Napi::Value NbdHandle::Close(const Napi::CallbackInfo& info) {
  if (!handle_) return Resolved(info.Env());
  Handle handle = std::move(handle_);
  handle_.reset();
  auto run = [handle, serial = serial_](Unit&) -> std::optional<Failure> {
    std::lock_guard<std::mutex> one(*serial);
    nbd_shutdown(handle.get(), 0);
    return std::nullopt;
  };
  return PromiseWorker<Unit>::Start(info.Env(), run, PromiseWorker<Unit>::Undefined, {Value()});
}

// cut(): shuts the connection's socket down from the event loop: every request in flight, and a connect still
// waiting for the server, fails at once with end of file. Returns whether a socket was there to cut.
Napi::Value NbdHandle::Cut(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), cutter_->Cut());
}

}  // namespace virtnbd
