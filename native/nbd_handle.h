// NbdHandle: one libnbd connection as a JS object; all I/O runs on the threadpool, getters read a cached snapshot.
#pragma once

#include <libnbd.h>
#include <napi.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "async.h"

namespace virtnbd {

// What the server negotiated; read once on the connect worker so getters never take the libnbd handle lock
// (which an in-flight pread holds) on the event loop.
struct NbdInfo {
  int64_t size = 0;
  int64_t maxBlock = 0;
  bool multiConn = false, readOnly = false, canZero = false, canFlush = false, canTrim = false;
  std::vector<std::pair<std::string, bool>> metaContexts;
};

// A duplicate of a connection's socket, so that the event loop can cut a connection whose requests hang:
// shutdown(2) wakes libnbd's poll with end of file while a worker holds the handle lock. The duplicate is closed
// with the handle (nbd_close), so its number is never another file's.
class SocketCutter {
 public:
  ~SocketCutter() { Release(); }
  // Called on the connecting worker once the socket exists; a cut asked for before is applied now.
  void Adopt(int socket);
  // Returns whether there was a socket to cut.
  bool Cut();
  void Release();

 private:
  std::atomic<int> fd_{-1};
  std::atomic<bool> cut_{false};
};

class NbdHandle : public Napi::ObjectWrap<NbdHandle> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit NbdHandle(const Napi::CallbackInfo& info);

 private:
  // Shared with in-flight workers: nbd_close runs when the last of them (or close()) lets go.
  using Handle = std::shared_ptr<nbd_handle>;
  using Op = std::function<int(nbd_handle*)>;

  Napi::Value ConnectUnix(const Napi::CallbackInfo& info);
  Napi::Value ConnectUri(const Napi::CallbackInfo& info);
  // Synchronous getters of one NbdInfo field, e.g. Get<&NbdInfo::size>.
  template <auto Field>
  Napi::Value Get(const Napi::CallbackInfo& info);
  Napi::Value CanMetaContext(const Napi::CallbackInfo& info);
  Napi::Value BlockStatus(const Napi::CallbackInfo& info);
  Napi::Value Pread(const Napi::CallbackInfo& info);
  Napi::Value PreadSummed(const Napi::CallbackInfo& info);
  Napi::Value Pwrite(const Napi::CallbackInfo& info);
  Napi::Value Zero(const Napi::CallbackInfo& info);
  Napi::Value Trim(const Napi::CallbackInfo& info);
  Napi::Value Flush(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value Cut(const Napi::CallbackInfo& info);

  // Queues op(handle) -> out on the threadpool, one op of this connection at a time; -1 rejects with that
  // thread's libnbd error.
  template <typename T>
  Napi::Value Submit(const Napi::CallbackInfo& info, std::function<int(nbd_handle*, T&)> op,
                     typename PromiseWorker<T>::Settle settle = PromiseWorker<T>::Undefined,
                     std::optional<Napi::Object> buffer = std::nullopt);
  // The same for an op that names its own failure (one it met before cleaning up, which may call libnbd again).
  template <typename T>
  Napi::Value SubmitChecked(const Napi::CallbackInfo& info, std::function<std::optional<Failure>(nbd_handle*, T&)> op,
                            typename PromiseWorker<T>::Settle settle, std::optional<Napi::Object> buffer);
  Napi::Value Submit(const Napi::CallbackInfo& info, Op op, std::optional<Napi::Object> buffer = std::nullopt);
  // pread/pwrite of a whole Buffer, split into requests the server accepts.
  using Transfer = int (*)(nbd_handle*, uint8_t* data, uint64_t count, uint64_t offset);
  Napi::Value BufferIo(const Napi::CallbackInfo& info, Transfer transfer);
  // zero/trim of [offset, offset+length), split below the 32-bit wire limit.
  Napi::Value RangeIo(const Napi::CallbackInfo& info, uint64_t offset, uint64_t length,
                      int (*request)(nbd_handle*, uint64_t count, uint64_t offset, uint32_t flags), uint32_t flags);
  Napi::Value Connect(const Napi::CallbackInfo& info, std::vector<std::string> contexts, Op connect);
  const NbdInfo& Connected(const Napi::CallbackInfo& info) const;
  uint64_t PayloadChunk() const;

  std::shared_ptr<SocketCutter> cutter_ = std::make_shared<SocketCutter>();
  Handle handle_;  // null once close() has started
  // Held by each op for its whole run: a pipelined read polls the handle between libnbd calls, and another thread's
  // call in between could take its replies and leave its poll waiting for nothing.
  std::shared_ptr<std::mutex> serial_ = std::make_shared<std::mutex>();
  std::optional<NbdInfo> info_;
};

}  // namespace virtnbd
