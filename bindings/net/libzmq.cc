// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "libzmq.h"

#include <dlfcn.h>

#include <cerrno>

namespace lmcache_cpp::bindings::net {

namespace {

template <typename Fn>
bool Lookup(void* handle, const char* name, Fn* out) {
  void* p = dlsym(handle, name);
  if (p == nullptr) return false;
  *out = reinterpret_cast<Fn>(p);
  return true;
}

}  // namespace

std::optional<Libzmq> Libzmq::Resolve(const std::string& module_path, std::string* why) {
  // RTLD_NOLOAD: only an object already loaded (pyzmq's); the reference it takes is kept for
  // the life of the process, as the functions are.
  void* handle = dlopen(module_path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) {
    const char* err = dlerror();
    *why = "pyzmq's extension " + module_path + " is not loaded" +
           (err ? std::string(": ") + err : "");
    return std::nullopt;
  }
  Libzmq z;
  const bool ok =
      Lookup(handle, "zmq_msg_init", &z.msg_init) && Lookup(handle, "zmq_msg_recv", &z.msg_recv) &&
      Lookup(handle, "zmq_msg_close", &z.msg_close) &&
      Lookup(handle, "zmq_msg_data", &z.msg_data) && Lookup(handle, "zmq_msg_size", &z.msg_size) &&
      Lookup(handle, "zmq_msg_more", &z.msg_more) && Lookup(handle, "zmq_send", &z.send) &&
      Lookup(handle, "zmq_errno", &z.errno_value) && Lookup(handle, "zmq_version", &z.version);
  if (!ok) {
    *why = "libzmq's functions are not exported by " + module_path + " or its libraries";
    return std::nullopt;
  }
  int major = 0, minor = 0, patch = 0;
  z.version(&major, &minor, &patch);
  if (major != 4) {
    *why = "libzmq " + std::to_string(major) + "." + std::to_string(minor) + " is not 4.x";
    return std::nullopt;
  }
  return z;
}

bool ReceiveMessage(const Libzmq& zmq, void* socket, Message* out, int* error) {
  for (;;) {
    ZmqMsg* frame = out->Append();
    if (zmq.msg_recv(frame, socket, kZmqDontWait) < 0) {
      const int e = zmq.errno_value();
      out->Clear();
      if (e == EINTR) continue;  // only the first frame can be interrupted: a message is whole
      *error = e;
      return false;
    }
    if (!zmq.msg_more(frame)) return true;
  }
}

int SendMessage(const Libzmq& zmq, void* socket, const std::string_view* frames, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const int flags = kZmqDontWait | (i + 1 < n ? kZmqSndMore : 0);
    if (zmq.send(socket, frames[i].data(), frames[i].size(), flags) < 0) {
      // Past the first frame libzmq takes the rest of a message it has started.
      return zmq.errno_value();
    }
  }
  return 0;
}

}  // namespace lmcache_cpp::bindings::net
