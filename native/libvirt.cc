// libvirt bindings: every daemon round trip runs on a worker; returned strings and checkpoints are always freed.
#include "libvirt.h"

#include <libvirt/libvirt-qemu.h>
#include <libvirt/virterror.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "args.h"
#include "async.h"

namespace virtnbd {

namespace {

struct LibvirtClasses {
  Napi::FunctionReference connection;
  Napi::FunctionReference domain;
};

// A failure saved before a cleanup call (virDomainCheckpointFree) resets libvirt's last error.
thread_local std::optional<Failure> savedFailure;

// Read on the thread where the call failed: virGetLastError() is thread-local.
Failure VirFailure() {
  if (savedFailure) {
    Failure failure = *savedFailure;
    savedFailure.reset();
    return failure;
  }
  virErrorPtr err = virGetLastError();
  if (!err) return {"unknown libvirt error", std::nullopt, "libvirt"};
  return {err->message ? err->message : "unknown libvirt error", err->code, "libvirt"};
}

// One daemon call at a time in this process. When keepalives close a connection, libvirt's client fails the call
// that was reading the socket, but a second call waiting beside it waited for ever (libvirt 9.0: a hung libvirtd,
// the job's end and a getAutostart in flight together). Queued here instead, the next call finds the connection
// closed and fails at once. The calls are short; nothing here needs two at once.
std::mutex& DaemonCalls() {
  static std::mutex calls;
  return calls;
}

// Queues op(resource) -> out on the threadpool, holding the resource and the JS wrapper; < 0 rejects.
template <typename Resource, typename T>
Napi::Value VirCall(Napi::Env env, Napi::Object self, std::shared_ptr<Resource> resource,
                    std::function<int(Resource*, T&)> op,
                    typename PromiseWorker<T>::Settle settle = PromiseWorker<T>::Undefined) {
  auto run = [resource, op](T& out) -> std::optional<Failure> {
    std::lock_guard<std::mutex> one(DaemonCalls());
    if (op(resource.get(), out) < 0) return VirFailure();
    return std::nullopt;
  };
  return PromiseWorker<T>::Start(env, run, settle, {self});
}

// Takes ownership of a libvirt-allocated string; null means the call failed.
int TakeString(char* s, std::string& out) {
  if (!s) return -1;
  out = s;
  free(s);
  return 0;
}

using IntPair = std::pair<int, int>;

Napi::Value StringValue(Napi::Env env, std::string& s) { return Napi::String::New(env, s); }

Napi::Value BoolValue(Napi::Env env, int& value) { return Napi::Boolean::New(env, value != 0); }
Napi::Value IntValue(Napi::Env env, int& value) { return Napi::Number::New(env, value); }

// Runs fn on a checkpoint looked up by name and frees it whatever fn returns.
int WithCheckpoint(virDomainPtr dom, const std::string& name, const std::function<int(virDomainCheckpointPtr)>& fn) {
  virDomainCheckpointPtr checkpoint = virDomainCheckpointLookupByName(dom, name.c_str(), 0);
  if (!checkpoint) return -1;
  int rc = fn(checkpoint);
  if (rc < 0) savedFailure = VirFailure();
  virDomainCheckpointFree(checkpoint);
  return rc;
}

// A domain pointer (from lookup/define) owned by a shared_ptr, null pointer meaning failure.
int TakeDomain(virDomainPtr dom, DomPtr& out) {
  if (!dom) return -1;
  out = DomPtr(dom, virDomainFree);
  return 0;
}

void IgnoreError(void*, virErrorPtr) {}

// A libvirt login (--user/--password) given up front: libvirt asks for it during the open, on the worker thread,
// and frees each answer itself.
struct Login {
  std::string user;
  std::string password;
};

// Without a login (data null), libvirt has asked its auth.conf first and only what it lacks comes here: a login
// name or password is then refused, since a backup must fail rather than prompt.
int AnswerFromLogin(virConnectCredentialPtr creds, unsigned int count, void* data) {
  const Login* login = static_cast<const Login*>(data);
  for (unsigned int i = 0; i < count; i++) {
    const char* answer;
    switch (creds[i].type) {
      case VIR_CRED_AUTHNAME:
        if (!login) return -1;
        answer = login->user.c_str();
        break;
      case VIR_CRED_USERNAME:  // SASL's authorization id: the login's user, else none
        answer = login ? login->user.c_str() : (creds[i].defresult ? creds[i].defresult : "");
        break;
      case VIR_CRED_PASSPHRASE:
        if (!login) return -1;
        answer = login->password.c_str();
        break;
      default:  // a realm or other question: libvirt's own default, else empty
        answer = creds[i].defresult ? creds[i].defresult : "";
    }
    creds[i].result = strdup(answer);
    if (!creds[i].result) return -1;
    creds[i].resultlen = strlen(answer);
  }
  return 0;
}

// libvirt's keepalive needs an event loop: its default one, run on a thread of its own for the process's life
// (registered before the first open, as libvirt requires).
void StartEventLoop() {
  static std::once_flag started;
  std::call_once(started, [] {
    if (virEventRegisterDefaultImpl() < 0) return;
    std::thread([] {
      for (;;) virEventRunDefaultImpl();
    }).detach();
  });
}

// libvirtOpen(uri, user?, password?, keepaliveInterval?, keepaliveCount?): virConnectOpenAuth, so that a daemon
// asking for a login (SASL) gets the one given, or the one in libvirt's auth.conf. With keepalives, libvirt closes
// the connection once the daemon or its host has answered none of them: calls waiting on it fail in place of
// waiting for ever (a hung libvirtd, a host gone silent under qemu+ssh).
Napi::Value LibvirtOpen(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string uri = ArgString(info, 0, "uri");
    std::optional<Login> login;
    if (info.Length() > 1 && !info[1].IsUndefined()) {
      login = Login{ArgString(info, 1, "user"), ArgString(info, 2, "password")};
    }
    int interval = 0;
    unsigned int count = 0;
    if (info.Length() > 4 && info[3].IsNumber() && info[4].IsNumber()) {
      interval = info[3].As<Napi::Number>().Int32Value();
      count = info[4].As<Napi::Number>().Uint32Value();
    }
    bool keepalive = interval > 0 && count > 0;
    auto run = [uri, login, keepalive, interval, count](ConnPtr& out) -> std::optional<Failure> {
      if (keepalive) StartEventLoop();
      int types[] = {VIR_CRED_AUTHNAME, VIR_CRED_USERNAME, VIR_CRED_PASSPHRASE, VIR_CRED_REALM};
      void* answers = login ? const_cast<Login*>(&*login) : nullptr;
      virConnectAuth auth = {types, sizeof(types) / sizeof(types[0]), AnswerFromLogin, answers};
      virConnectPtr conn = virConnectOpenAuth(uri.c_str(), &auth, 0);
      if (!conn) return VirFailure();
      out = ConnPtr(conn, virConnectClose);
      // Best effort: a driver without keepalive (a local test:///) still works, as before.
      if (keepalive && virConnectSetKeepAlive(conn, interval, count) < 0) virResetLastError();
      return std::nullopt;
    };
    auto settle = [](Napi::Env env, ConnPtr& conn) -> Napi::Value {
      return LibvirtConnection::New(env, std::move(conn));
    };
    // On a thread of its own: the open may never return (see DetachedCall), and the caller may give up on it.
    return DetachedCall<ConnPtr>::Start(info.Env(), run, settle);
  });
}

}  // namespace

// ---- connection ----

Napi::Function LibvirtConnection::Define(Napi::Env env) {
  return DefineClass(env, "LibvirtConnection",
                     {
                         InstanceMethod<&LibvirtConnection::LookupDomainByName>("lookupDomainByName"),
                         InstanceMethod<&LibvirtConnection::DefineXML>("defineXML"),
                         InstanceMethod<&LibvirtConnection::StorageVolumePath>("storageVolumePath"),
                         InstanceMethod<&LibvirtConnection::GetURI>("getURI"),
                         InstanceMethod<&LibvirtConnection::IsAlive>("isAlive"),
                         InstanceMethod<&LibvirtConnection::Close>("close"),
                     });
}

Napi::Object LibvirtConnection::New(Napi::Env env, ConnPtr conn) {
  return env.GetInstanceData<LibvirtClasses>()->connection.New({Napi::External<ConnPtr>::New(env, &conn)});
}

// Only built by libvirtOpen, which passes the native pointer as an External.
LibvirtConnection::LibvirtConnection(const Napi::CallbackInfo& info) : Napi::ObjectWrap<LibvirtConnection>(info) {
  if (!info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "use libvirtOpen()");
  conn_ = *info[0].As<Napi::External<ConnPtr>>().Data();
}

const ConnPtr& LibvirtConnection::Open(const Napi::CallbackInfo& info) const {
  if (!conn_) throw Napi::Error::New(info.Env(), "libvirt connection is closed");
  return conn_;
}

Napi::Value LibvirtConnection::LookupDomainByName(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string name = ArgString(info, 0, "name");
    return VirCall<virConnect, DomPtr>(
        info.Env(), Value(), Open(info),
        [name](virConnectPtr c, DomPtr& out) { return TakeDomain(virDomainLookupByName(c, name.c_str()), out); },
        [this](Napi::Env env, DomPtr& dom) { return Adopt(env, dom); });
  });
}

Napi::Value LibvirtConnection::DefineXML(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string xml = ArgString(info, 0, "xml");
    return VirCall<virConnect, DomPtr>(
        info.Env(), Value(), Open(info),
        [xml](virConnectPtr c, DomPtr& out) { return TakeDomain(virDomainDefineXML(c, xml.c_str()), out); },
        [this](Napi::Env env, DomPtr& dom) { return Adopt(env, dom); });
  });
}

// The path of volume `volume` in storage pool `pool` (a disk of type='volume'); pool and volume are freed here.
Napi::Value LibvirtConnection::StorageVolumePath(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string pool = ArgString(info, 0, "pool");
    std::string volume = ArgString(info, 1, "volume");
    return VirCall<virConnect, std::string>(
        info.Env(), Value(), Open(info),
        [pool, volume](virConnectPtr c, std::string& out) {
          virStoragePoolPtr p = virStoragePoolLookupByName(c, pool.c_str());
          if (!p) return -1;
          virStorageVolPtr v = virStorageVolLookupByName(p, volume.c_str());
          int rc = v ? TakeString(virStorageVolGetPath(v), out) : -1;
          if (rc < 0) savedFailure = VirFailure();  // the frees below reset libvirt's last error
          if (v) virStorageVolFree(v);
          virStoragePoolFree(p);
          return rc;
        },
        StringValue);
  });
}

Napi::Value LibvirtConnection::GetURI(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    return VirCall<virConnect, std::string>(
        info.Env(), Value(), Open(info),
        [](virConnectPtr c, std::string& out) { return TakeString(virConnectGetURI(c), out); }, StringValue);
  });
}

// False once the daemon connection is gone (libvirtd stopped or crashed); a closed connection rejects.
Napi::Value LibvirtConnection::IsAlive(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    return VirCall<virConnect, int>(
        info.Env(), Value(), Open(info), [](virConnectPtr c, int& out) { return out = virConnectIsAlive(c); },
        BoolValue);
  });
}

// The connection's JS object is kept alive by the worker that settles here, so `this` is valid.
Napi::Value LibvirtConnection::Adopt(Napi::Env env, DomPtr& dom) {
  auto slot = std::make_shared<DomainSlot>(DomainSlot{std::move(dom)});
  domains_.erase(std::remove_if(domains_.begin(), domains_.end(), [](const auto& known) { return known.expired(); }),
                 domains_.end());
  domains_.push_back(slot);
  return LibvirtDomain::New(env, std::move(slot));
}

// Idempotent. Takes the handles of this connection's domains as well (their later calls reject), so that the
// worker owns the last references: virDomainFree and virConnectClose, with its round trip, run on the threadpool.
Napi::Value LibvirtConnection::Close(const Napi::CallbackInfo& info) {
  if (!conn_) return Resolved(info.Env());
  ConnPtr conn = std::move(conn_);
  conn_.reset();
  std::vector<DomPtr> doms;
  for (auto& known : domains_) {
    if (auto slot = known.lock()) doms.push_back(std::move(slot->dom));
  }
  domains_.clear();
  return PromiseWorker<Unit>::Start(
      info.Env(),
      [conn, doms](Unit&) mutable -> std::optional<Failure> {
        std::lock_guard<std::mutex> one(DaemonCalls());
        doms.clear();
        conn.reset();
        return std::nullopt;
      },
      PromiseWorker<Unit>::Undefined, {Value()});
}

// ---- domain ----

Napi::Function LibvirtDomain::Define(Napi::Env env) {
  return DefineClass(env, "LibvirtDomain",
                     {
                         InstanceMethod<&LibvirtDomain::Name>("name"),
                         InstanceMethod<&LibvirtDomain::GetXMLDesc>("getXMLDesc"),
                         InstanceMethod<&LibvirtDomain::IsActive>("isActive"),
                         InstanceMethod<&LibvirtDomain::HasManagedSaveImage>("hasManagedSaveImage"),
                         InstanceMethod<&LibvirtDomain::GetState>("getState"),
                         InstanceMethod<&LibvirtDomain::GetAutostart>("getAutostart"),
                         InstanceMethod<&LibvirtDomain::SetAutostart>("setAutostart"),
                         InstanceMethod<&LibvirtDomain::Create>("create"),
                         InstanceMethod<&LibvirtDomain::Destroy>("destroy"),
                         InstanceMethod<&LibvirtDomain::Suspend>("suspend"),
                         InstanceMethod<&LibvirtDomain::Resume>("resume"),
                         InstanceMethod<&LibvirtDomain::FSFreeze>("fsFreeze"),
                         InstanceMethod<&LibvirtDomain::FSThaw>("fsThaw"),
                         InstanceMethod<&LibvirtDomain::Undefine>("undefine"),
                         InstanceMethod<&LibvirtDomain::BackupBegin>("backupBegin"),
                         InstanceMethod<&LibvirtDomain::BackupGetXMLDesc>("backupGetXMLDesc"),
                         InstanceMethod<&LibvirtDomain::AbortJob>("abortJob"),
                         InstanceMethod<&LibvirtDomain::GetJobType>("getJobType"),
                         InstanceMethod<&LibvirtDomain::ListCheckpointNames>("listCheckpointNames"),
                         InstanceMethod<&LibvirtDomain::CheckpointGetXMLDesc>("checkpointGetXMLDesc"),
                         InstanceMethod<&LibvirtDomain::CheckpointCreateXML>("checkpointCreateXML"),
                         InstanceMethod<&LibvirtDomain::CheckpointDelete>("checkpointDelete"),
                         InstanceMethod<&LibvirtDomain::QemuMonitorCommand>("qemuMonitorCommand"),
                     });
}

Napi::Object LibvirtDomain::New(Napi::Env env, DomainSlotPtr slot) {
  return env.GetInstanceData<LibvirtClasses>()->domain.New({Napi::External<DomainSlotPtr>::New(env, &slot)});
}

LibvirtDomain::LibvirtDomain(const Napi::CallbackInfo& info) : Napi::ObjectWrap<LibvirtDomain>(info) {
  if (!info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "use lookupDomainByName() or defineXML()");
  slot_ = *info[0].As<Napi::External<DomainSlotPtr>>().Data();
  const char* name = virDomainGetName(slot_->dom.get());
  name_ = name ? name : "";
}

// Every domain method below is: parse arguments, then one Call with a lambda doing the libvirt call.
template <typename T>
Napi::Value LibvirtDomain::Call(const Napi::CallbackInfo& info, std::function<int(virDomainPtr, T&)> op,
                                typename PromiseWorker<T>::Settle settle) {
  return AsPromise(info.Env(), [&] {
    if (!slot_->dom) throw Napi::Error::New(info.Env(), "libvirt connection is closed");
    return VirCall<virDomain, T>(info.Env(), Value(), slot_->dom, std::move(op), std::move(settle));
  });
}

Napi::Value LibvirtDomain::Name(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), name_); }

Napi::Value LibvirtDomain::GetXMLDesc(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    uint32_t flags = ArgU32(info, 0, "flags");
    auto op = [flags](virDomainPtr d, std::string& out) { return TakeString(virDomainGetXMLDesc(d, flags), out); };
    return Call<std::string>(info, op, StringValue);
  });
}

Napi::Value LibvirtDomain::IsActive(const Napi::CallbackInfo& info) {
  return Call<int>(info, [](virDomainPtr d, int& out) { return out = virDomainIsActive(d); }, BoolValue);
}

Napi::Value LibvirtDomain::HasManagedSaveImage(const Napi::CallbackInfo& info) {
  return Call<int>(info, [](virDomainPtr d, int& out) { return out = virDomainHasManagedSaveImage(d, 0); }, BoolValue);
}

Napi::Value LibvirtDomain::GetState(const Napi::CallbackInfo& info) {
  auto op = [](virDomainPtr d, IntPair& out) { return virDomainGetState(d, &out.first, &out.second, 0); };
  return Call<IntPair>(info, op, [](Napi::Env env, IntPair& out) -> Napi::Value {
    Napi::Array array = Napi::Array::New(env, 2);
    array.Set(0u, out.first);
    array.Set(1u, out.second);
    return array;
  });
}

Napi::Value LibvirtDomain::GetAutostart(const Napi::CallbackInfo& info) {
  return Call<int>(info, [](virDomainPtr d, int& out) { return virDomainGetAutostart(d, &out); }, BoolValue);
}

Napi::Value LibvirtDomain::SetAutostart(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    int autostart = ArgBool(info, 0, "autostart") ? 1 : 0;
    return Call<Unit>(info, [autostart](virDomainPtr d, Unit&) { return virDomainSetAutostart(d, autostart); });
  });
}

Napi::Value LibvirtDomain::Create(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    uint32_t flags = ArgU32(info, 0, "flags");
    return Call<Unit>(info, [flags](virDomainPtr d, Unit&) { return virDomainCreateWithFlags(d, flags); });
  });
}

Napi::Value LibvirtDomain::Destroy(const Napi::CallbackInfo& info) {
  return Call<Unit>(info, [](virDomainPtr d, Unit&) { return virDomainDestroy(d); });
}

Napi::Value LibvirtDomain::Suspend(const Napi::CallbackInfo& info) {
  return Call<Unit>(info, [](virDomainPtr d, Unit&) { return virDomainSuspend(d); });
}

Napi::Value LibvirtDomain::Resume(const Napi::CallbackInfo& info) {
  return Call<Unit>(info, [](virDomainPtr d, Unit&) { return virDomainResume(d); });
}

// fsFreeze(mountpoints: string[]): through the guest agent; an empty list freezes every filesystem. Resolves to the
// number frozen.
Napi::Value LibvirtDomain::FSFreeze(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::vector<std::string> mountpoints = ArgStrings(info, 0, "mountpoints");
    return Call<int>(info, [mountpoints](virDomainPtr d, int& out) {
      std::vector<const char*> names;
      for (const std::string& m : mountpoints) names.push_back(m.c_str());
      return out = virDomainFSFreeze(d, names.empty() ? nullptr : names.data(), names.size(), 0);
    }, IntValue);
  });
}

// fsThaw(): every filesystem the agent froze; resolves to the number thawed.
Napi::Value LibvirtDomain::FSThaw(const Napi::CallbackInfo& info) {
  return Call<int>(info, [](virDomainPtr d, int& out) { return out = virDomainFSThaw(d, nullptr, 0, 0); }, IntValue);
}

Napi::Value LibvirtDomain::Undefine(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    uint32_t flags = ArgU32(info, 0, "flags");
    return Call<Unit>(info, [flags](virDomainPtr d, Unit&) { return virDomainUndefineFlags(d, flags); });
  });
}

Napi::Value LibvirtDomain::BackupBegin(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string backup = ArgString(info, 0, "backupXml");
    std::optional<std::string> checkpoint = ArgOptString(info, 1, "checkpointXml");
    uint32_t flags = ArgU32(info, 2, "flags");
    return Call<Unit>(info, [backup, checkpoint, flags](virDomainPtr d, Unit&) {
      return virDomainBackupBegin(d, backup.c_str(), checkpoint ? checkpoint->c_str() : nullptr, flags);
    });
  });
}

Napi::Value LibvirtDomain::BackupGetXMLDesc(const Napi::CallbackInfo& info) {
  auto op = [](virDomainPtr d, std::string& out) { return TakeString(virDomainBackupGetXMLDesc(d, 0), out); };
  return Call<std::string>(info, op, StringValue);
}

Napi::Value LibvirtDomain::AbortJob(const Napi::CallbackInfo& info) {
  return Call<Unit>(info, [](virDomainPtr d, Unit&) { return virDomainAbortJob(d); });
}

// type comes from the out-parameter; operation from the typed parameter, 0 when the daemon does not send it.
Napi::Value LibvirtDomain::GetJobType(const Napi::CallbackInfo& info) {
  auto op = [](virDomainPtr d, IntPair& out) {
    virTypedParameterPtr params = nullptr;
    int count = 0;
    if (virDomainGetJobStats(d, &out.first, &params, &count, 0) < 0) return -1;
    if (virTypedParamsGetInt(params, count, VIR_DOMAIN_JOB_OPERATION, &out.second) != 1) out.second = 0;
    virTypedParamsFree(params, count);
    return 0;
  };
  return Call<IntPair>(info, op, [](Napi::Env env, IntPair& out) -> Napi::Value {
    Napi::Object result = Napi::Object::New(env);
    result.Set("type", out.first);
    result.Set("operation", out.second);
    return result;
  });
}

Napi::Value LibvirtDomain::ListCheckpointNames(const Napi::CallbackInfo& info) {
  using Names = std::vector<std::string>;
  auto op = [](virDomainPtr d, Names& out) {
    virDomainCheckpointPtr* checkpoints = nullptr;
    int count = virDomainListAllCheckpoints(d, &checkpoints, 0);
    for (int k = 0; k < count; k++) {
      out.emplace_back(virDomainCheckpointGetName(checkpoints[k]));
      virDomainCheckpointFree(checkpoints[k]);
    }
    free(checkpoints);
    return count;
  };
  return Call<Names>(info, op, [](Napi::Env env, Names& out) -> Napi::Value { return ToArray(env, out); });
}

Napi::Value LibvirtDomain::CheckpointGetXMLDesc(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string name = ArgString(info, 0, "name");
    uint32_t flags = ArgU32(info, 1, "flags");
    auto op = [name, flags](virDomainPtr d, std::string& out) {
      return WithCheckpoint(d, name, [&](virDomainCheckpointPtr c) {
        return TakeString(virDomainCheckpointGetXMLDesc(c, flags), out);
      });
    };
    return Call<std::string>(info, op, StringValue);
  });
}

Napi::Value LibvirtDomain::CheckpointCreateXML(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string xml = ArgString(info, 0, "xml");
    uint32_t flags = ArgU32(info, 1, "flags");
    auto op = [xml, flags](virDomainPtr d, std::string& out) {
      virDomainCheckpointPtr checkpoint = virDomainCheckpointCreateXML(d, xml.c_str(), flags);
      if (!checkpoint) return -1;
      out = virDomainCheckpointGetName(checkpoint);
      virDomainCheckpointFree(checkpoint);
      return 0;
    };
    return Call<std::string>(info, op, StringValue);
  });
}

Napi::Value LibvirtDomain::CheckpointDelete(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string name = ArgString(info, 0, "name");
    uint32_t flags = ArgU32(info, 1, "flags");
    return Call<Unit>(info, [name, flags](virDomainPtr d, Unit&) {
      return WithCheckpoint(d, name, [&](virDomainCheckpointPtr c) { return virDomainCheckpointDelete(c, flags); });
    });
  });
}

Napi::Value LibvirtDomain::QemuMonitorCommand(const Napi::CallbackInfo& info) {
  return AsPromise(info.Env(), [&] {
    std::string command = ArgString(info, 0, "command");
    uint32_t flags = ArgBool(info, 1, "hmp") ? VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP : 0;
    auto op = [command, flags](virDomainPtr d, std::string& out) {
      char* result = nullptr;
      if (virDomainQemuMonitorCommand(d, command.c_str(), &result, flags) < 0) return -1;
      return TakeString(result, out);
    };
    return Call<std::string>(info, op, StringValue);
  });
}

void InitLibvirt(Napi::Env env, Napi::Object exports) {
  if (virInitialize() < 0) throw MakeError(env, VirFailure());
  // Errors are reported through promises; libvirt's default handler would also print them to stderr.
  virSetErrorFunc(nullptr, IgnoreError);
  auto* classes = new LibvirtClasses{Napi::Persistent(LibvirtConnection::Define(env)),
                                     Napi::Persistent(LibvirtDomain::Define(env))};
  env.SetInstanceData(classes);
  exports.Set("libvirtOpen", Napi::Function::New(env, LibvirtOpen, "libvirtOpen"));
}

}  // namespace virtnbd
