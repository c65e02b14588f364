// LibvirtConnection/LibvirtDomain wrappers: daemon calls run off the event loop, errors keep libvirt's code.
#pragma once

#include <libvirt/libvirt.h>
#include <napi.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "async.h"

namespace virtnbd {

// virConnectClose / virDomainFree run when the last owner (wrapper or in-flight worker) lets go.
using ConnPtr = std::shared_ptr<virConnect>;
using DomPtr = std::shared_ptr<virDomain>;

// A domain handle that both its wrapper and its connection reach: close() empties the slot of every domain the
// connection handed out, so the daemon connection really closes (a domain holds its connection open, and a client
// that exits with the connection open makes libvirtd log an I/O error).
struct DomainSlot {
  DomPtr dom;
};
using DomainSlotPtr = std::shared_ptr<DomainSlot>;

class LibvirtConnection : public Napi::ObjectWrap<LibvirtConnection> {
 public:
  static Napi::Function Define(Napi::Env env);
  static Napi::Object New(Napi::Env env, ConnPtr conn);
  explicit LibvirtConnection(const Napi::CallbackInfo& info);

 private:
  Napi::Value LookupDomainByName(const Napi::CallbackInfo& info);
  Napi::Value DefineXML(const Napi::CallbackInfo& info);
  Napi::Value StorageVolumePath(const Napi::CallbackInfo& info);
  Napi::Value GetURI(const Napi::CallbackInfo& info);
  Napi::Value IsAlive(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  const ConnPtr& Open(const Napi::CallbackInfo& info) const;
  // Wraps a domain this connection returns and remembers its slot for close().
  Napi::Value Adopt(Napi::Env env, DomPtr& dom);

  ConnPtr conn_;  // null once close() has started
  std::vector<std::weak_ptr<DomainSlot>> domains_;
};

class LibvirtDomain : public Napi::ObjectWrap<LibvirtDomain> {
 public:
  static Napi::Function Define(Napi::Env env);
  static Napi::Object New(Napi::Env env, DomainSlotPtr slot);
  explicit LibvirtDomain(const Napi::CallbackInfo& info);

 private:
  Napi::Value Name(const Napi::CallbackInfo& info);
  Napi::Value GetXMLDesc(const Napi::CallbackInfo& info);
  Napi::Value IsActive(const Napi::CallbackInfo& info);
  Napi::Value HasManagedSaveImage(const Napi::CallbackInfo& info);
  Napi::Value GetState(const Napi::CallbackInfo& info);
  Napi::Value GetAutostart(const Napi::CallbackInfo& info);
  Napi::Value SetAutostart(const Napi::CallbackInfo& info);
  Napi::Value Create(const Napi::CallbackInfo& info);
  Napi::Value Destroy(const Napi::CallbackInfo& info);
  Napi::Value Suspend(const Napi::CallbackInfo& info);
  Napi::Value Resume(const Napi::CallbackInfo& info);
  Napi::Value FSFreeze(const Napi::CallbackInfo& info);
  Napi::Value FSThaw(const Napi::CallbackInfo& info);
  Napi::Value Undefine(const Napi::CallbackInfo& info);
  Napi::Value BackupBegin(const Napi::CallbackInfo& info);
  Napi::Value BackupGetXMLDesc(const Napi::CallbackInfo& info);
  Napi::Value AbortJob(const Napi::CallbackInfo& info);
  Napi::Value GetJobType(const Napi::CallbackInfo& info);
  Napi::Value ListCheckpointNames(const Napi::CallbackInfo& info);
  Napi::Value CheckpointGetXMLDesc(const Napi::CallbackInfo& info);
  Napi::Value CheckpointCreateXML(const Napi::CallbackInfo& info);
  Napi::Value CheckpointDelete(const Napi::CallbackInfo& info);
  Napi::Value QemuMonitorCommand(const Napi::CallbackInfo& info);

  // Queues op(domain) -> out on the threadpool; < 0 rejects with that thread's libvirt error.
  template <typename T>
  Napi::Value Call(const Napi::CallbackInfo& info, std::function<int(virDomainPtr, T&)> op,
                   typename PromiseWorker<T>::Settle settle = PromiseWorker<T>::Undefined);

  DomainSlotPtr slot_;  // its dom is null once the connection is closed
  std::string name_;  // virDomainGetName is local; cached so name() stays synchronous
};

// virInitialize, silences libvirt's stderr error printer, exports libvirtOpen.
void InitLibvirt(Napi::Env env, Napi::Object exports);

}  // namespace virtnbd
