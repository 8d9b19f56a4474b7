// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// libzmq, called from C++ on sockets that pyzmq owns (zmq.Socket.underlying). The calls must go to
// the very library pyzmq uses, so nothing here links libzmq: Libzmq::Resolve looks the functions
// up through pyzmq's own extension module (dlopen RTLD_NOLOAD of its file, then dlsym, which also
// searches the libraries that module depends on). The few zmq.h declarations needed are restated
// here; libzmq 4.x keeps them stable.
//
// A socket is not thread-safe: call these only on the thread that owns it, as pyzmq requires.

#ifndef LMCACHE_CPP_BINDINGS_NET_LIBZMQ_H_
#define LMCACHE_CPP_BINDINGS_NET_LIBZMQ_H_

#include <cstddef>
#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace lmcache_cpp::bindings::net {

// libzmq's message type (zmq.h: 64 bytes, pointer-aligned); only libzmq reads its contents.
struct alignas(sizeof(void*)) ZmqMsg {
  unsigned char bytes[64];
};

// The libzmq functions the loop calls, resolved at run time.
struct Libzmq {
  int (*msg_init)(ZmqMsg*) = nullptr;
  int (*msg_recv)(ZmqMsg*, void*, int) = nullptr;
  int (*msg_close)(ZmqMsg*) = nullptr;
  void* (*msg_data)(ZmqMsg*) = nullptr;
  size_t (*msg_size)(const ZmqMsg*) = nullptr;
  int (*msg_more)(const ZmqMsg*) = nullptr;
  int (*send)(void*, const void*, size_t, int) = nullptr;
  int (*errno_value)() = nullptr;
  void (*version)(int*, int*, int*) = nullptr;

  // The functions of the libzmq that the shared object at `module_path` (pyzmq's backend
  // extension, already loaded) was linked with. nullopt, with the reason in *why, when that
  // object is not loaded or neither it nor its dependencies export them.
  static std::optional<Libzmq> Resolve(const std::string& module_path, std::string* why);
};

// One received message: its frames, owned (closed on destruction).
class Message {
 public:
  explicit Message(const Libzmq* zmq) : zmq_(zmq) {}
  Message(Message&& other) noexcept : zmq_(other.zmq_), frames_(std::move(other.frames_)) {
    other.frames_.clear();
  }
  Message& operator=(Message&& other) noexcept {
    if (this != &other) {
      Clear();
      zmq_ = other.zmq_;
      frames_ = std::move(other.frames_);
      other.frames_.clear();
    }
    return *this;
  }
  Message(const Message&) = delete;
  ~Message() { Clear(); }

  size_t size() const { return frames_.size(); }
  std::string_view frame(size_t i) const {
    ZmqMsg* m = const_cast<ZmqMsg*>(&frames_[i]);
    return {static_cast<const char*>(zmq_->msg_data(m)), zmq_->msg_size(m)};
  }
  ZmqMsg* Append() {
    frames_.emplace_back();
    zmq_->msg_init(&frames_.back());
    return &frames_.back();
  }
  void Clear() {
    for (ZmqMsg& m : frames_) zmq_->msg_close(&m);
    frames_.clear();
  }

 private:
  const Libzmq* zmq_;
  // A deque: libzmq messages must not be relocated by copying their bytes.
  std::deque<ZmqMsg> frames_;
};

// zmq.h's send/receive flags.
constexpr int kZmqDontWait = 1;
constexpr int kZmqSndMore = 2;

// Reads one whole message into *out without blocking (an interrupted read is retried); false
// with *error set to zmq_errno() otherwise (EAGAIN: none queued).
bool ReceiveMessage(const Libzmq& zmq, void* socket, Message* out, int* error);

// Sends frames[0..n) as one message without blocking; 0, or zmq_errno() of the first frame,
// in which case nothing was queued (EAGAIN: the queue is full or there is no peer; from a ROUTER
// with ROUTER_MANDATORY, EHOSTUNREACH: the peer is gone). The bytes are copied.
int SendMessage(const Libzmq& zmq, void* socket, const std::string_view* frames, size_t n);

}  // namespace lmcache_cpp::bindings::net

#endif  // LMCACHE_CPP_BINDINGS_NET_LIBZMQ_H_
