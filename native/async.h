// Promise-returning AsyncWorker: blocking calls run on the threadpool; used JS objects stay referenced till settled.
#pragma once

#include <napi.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace virtnbd {

// A library error, captured on the worker thread because libnbd and libvirt keep errors thread-local.
struct Failure {
  std::string message;
  std::optional<int> code;
  std::string library;
};

// The JS face of a Failure: Error(message) with `code` and `library` (NativeError in addon.ts).
inline Napi::Error MakeError(Napi::Env env, const Failure& f) {
  Napi::Error err = Napi::Error::New(env, f.message);
  if (f.code) err.Set("code", Napi::Number::New(env, *f.code));
  err.Set("library", Napi::String::New(env, f.library));
  return err;
}

// Result type of calls that resolve to undefined.
struct Unit {};

template <typename T>
class PromiseWorker final : public Napi::AsyncWorker {
 public:
  // Runs on the threadpool: no JS allowed. Fills the result or returns the failure.
  using Run = std::function<std::optional<Failure>(T&)>;
  // Runs on the event loop: turns the result into the resolved value.
  using Settle = std::function<Napi::Value(Napi::Env, T&)>;

  static Napi::Value Start(Napi::Env env, Run run, Settle settle = Undefined, std::vector<Napi::Object> keep = {}) {
    auto* worker = new PromiseWorker(env, std::move(run), std::move(settle), keep);
    Napi::Promise promise = worker->deferred_.Promise();
    worker->Queue();
    return promise;
  }

  static Napi::Value Undefined(Napi::Env env, T&) { return env.Undefined(); }

 private:
  PromiseWorker(Napi::Env env, Run run, Settle settle, const std::vector<Napi::Object>& keep)
      : Napi::AsyncWorker(env, "virtnbd_native"),
        deferred_(Napi::Promise::Deferred::New(env)),
        run_(std::move(run)),
        settle_(std::move(settle)) {
    for (const Napi::Object& object : keep) keep_.push_back(Napi::Persistent(object));
  }

  void Execute() override {
    failure_ = run_(result_);
    // Drop the captures here, off the event loop: a captured handle may be the last owner (e.g. nbd_close).
    run_ = nullptr;
    if (failure_) SetError(failure_->message);
  }

  void OnOK() override {
    try {
      deferred_.Resolve(settle_(Env(), result_));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }

  void OnError(const Napi::Error& e) override {
    deferred_.Reject(MakeError(Env(), failure_.value_or(Failure{e.Message(), std::nullopt, "native"})).Value());
  }

  Napi::Promise::Deferred deferred_;
  Run run_;
  Settle settle_;
  std::vector<Napi::ObjectReference> keep_;
  T result_{};
  std::optional<Failure> failure_;
};

// A promise whose blocking call runs on a detached thread of its own, not on the threadpool: for a call that may
// never return (libvirt's open on a daemon that accepts and never answers). Node joins the threadpool's threads when
// the process exits, so such a call there would hold the exit for ever; a detached thread does not. The result comes
// back through a thread-safe function, which keeps the event loop alive until then, or until the caller abandons it.
template <typename T>
class DetachedCall {
 public:
  static Napi::Value Start(Napi::Env env, typename PromiseWorker<T>::Run run, typename PromiseWorker<T>::Settle settle) {
    auto* call = new DetachedCall(env, std::move(run), std::move(settle));
    Napi::Promise promise = call->deferred_.Promise();
    call->done_ = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "virtnbd_detached", 0, 1);
    // promise.abandon(): the caller gave up on the call, which then no longer keeps the event loop alive. Both it
    // and Settle run on the event loop, so the flag needs no lock.
    auto settled = call->settled_;
    Napi::ThreadSafeFunction done = call->done_;
    promise.Set("abandon", Napi::Function::New(env, [settled, done](const Napi::CallbackInfo& info) mutable {
      if (!*settled) done.Unref(info.Env());
    }));
    std::thread([call] {
      call->failure_ = call->run_(call->result_);
      call->run_ = nullptr;
      // At the process's exit the function is gone (napi_closing): the call is then left as it is.
      call->done_.BlockingCall(call, [](Napi::Env env, Napi::Function, DetachedCall* c) { c->Settle(env); });
    }).detach();
    return promise;
  }

 private:
  DetachedCall(Napi::Env env, typename PromiseWorker<T>::Run run, typename PromiseWorker<T>::Settle settle)
      : deferred_(Napi::Promise::Deferred::New(env)), run_(std::move(run)), settle_(std::move(settle)) {}

  // On the event loop: settles the promise, then frees the call.
  void Settle(Napi::Env env) {
    if (failure_) {
      deferred_.Reject(MakeError(env, *failure_).Value());
    } else {
      try {
        deferred_.Resolve(settle_(env, result_));
      } catch (const Napi::Error& e) {
        deferred_.Reject(e.Value());
      }
    }
    *settled_ = true;
    done_.Release();
    delete this;
  }

  Napi::Promise::Deferred deferred_;
  typename PromiseWorker<T>::Run run_;
  typename PromiseWorker<T>::Settle settle_;
  Napi::ThreadSafeFunction done_;
  std::shared_ptr<bool> settled_ = std::make_shared<bool>(false);
  T result_{};
  std::optional<Failure> failure_;
};

// Promise methods report bad arguments as rejections, not synchronous throws.
template <typename Body>
Napi::Value AsPromise(Napi::Env env, Body&& body) {
  try {
    return body();
  } catch (const Napi::Error& e) {
    auto deferred = Napi::Promise::Deferred::New(env);
    deferred.Reject(e.Value());
    return deferred.Promise();
  }
}

inline Napi::Value Resolved(Napi::Env env) {
  auto deferred = Napi::Promise::Deferred::New(env);
  deferred.Resolve(env.Undefined());
  return deferred.Promise();
}

}  // namespace virtnbd
