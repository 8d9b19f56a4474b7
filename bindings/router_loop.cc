// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "router_loop.h"

#include <dlfcn.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>

namespace lmcache_cpp::bindings::wire {

namespace {

// zmq.h's flags and error numbers (stable across libzmq 4.x).
constexpr int kDontWait = 1;
constexpr int kSndMore = 2;
constexpr auto kInternal = static_cast<uint32_t>(StatusCode::kInternal);

double MonotonicSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

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

RouterLoop::RouterLoop(const FastPath* path, Libzmq zmq, void* socket, std::vector<double> bounds)
    : path_(path), zmq_(zmq), socket_(socket), bounds_(std::move(bounds)) {}

void RouterLoop::AddClient(std::string identity, ClientId id) {
  clients_[std::move(identity)] = Client{id, 0};
}

void RouterLoop::RemoveClient(const std::string& identity) { clients_.erase(identity); }

std::optional<double> RouterLoop::LastSeen(const std::string& identity) const {
  auto it = clients_.find(identity);
  if (it == clients_.end() || it->second.last_seen == 0) return std::nullopt;
  return it->second.last_seen;
}

bool RouterLoop::Receive(Message* out, int* error) {
  for (;;) {
    ZmqMsg* frame = out->Append();
    if (zmq_.msg_recv(frame, socket_, kDontWait) < 0) {
      const int e = zmq_.errno_value();
      if (e == EINTR) {
        out->Clear();  // only the first frame can be interrupted: a message arrives whole
        continue;
      }
      *error = e;
      out->Clear();
      return false;
    }
    if (!zmq_.msg_more(frame)) return true;
  }
}

RouterLoop::Drained RouterLoop::Drain(size_t max_messages) {
  Drained out(&zmq_);
  Message message(&zmq_);
  while (out.answered < max_messages) {
    int error = 0;
    if (!Receive(&message, &error)) {
      if (error != EAGAIN) out.error = error;
      return out;
    }
    const auto received = std::chrono::steady_clock::now();
    // ROUTER: identity, header, payload.
    auto client =
        message.size() == 3 ? clients_.find(std::string(message.frame(0))) : clients_.end();
    if (client == clients_.end()) {
      out.unhandled = std::move(message);
      return out;
    }
    client->second.last_seen = MonotonicSeconds();
    std::optional<Reply> reply =
        path_->Handle(client->second.id, message.frame(1), message.frame(2));
    if (!reply.has_value()) {
      out.unhandled = std::move(message);
      out.tried = true;
      return out;
    }
    Record(reply->request_type, reply->status,
           std::chrono::duration<double>(std::chrono::steady_clock::now() - received).count());
    if (reply->status == kInternal) {
      // The error reply's payload is {"message": str}.
      Reader r(reply->payload);
      uint32_t fields = 0;
      std::string_view key, text;
      if (!r.ReadMapHeader(&fields) || !r.ReadStr(UINT32_MAX, &key) ||
          !r.ReadStr(UINT32_MAX, &text)) {
        text = "(no message)";
      }
      out.failures.push_back({client->second.id, reply->request_type, std::string(text)});
    }
    const std::string_view identity = message.frame(0);
    // ROUTER_MANDATORY: a peer that is gone (EHOSTUNREACH) or whose queue is full (EAGAIN)
    // fails the first frame and nothing is queued; the client times out on its side.
    if (zmq_.send(socket_, identity.data(), identity.size(), kDontWait | kSndMore) < 0) {
      std::lock_guard<std::mutex> lock(stats_mu_);
      ++stats_.dropped_replies;
    } else {
      zmq_.send(socket_, reply->header.data(), reply->header.size(), kDontWait | kSndMore);
      zmq_.send(socket_, reply->payload.data(), reply->payload.size(), kDontWait);
    }
    message.Clear();
    ++out.answered;
  }
  return out;
}

void RouterLoop::Record(uint32_t type, uint32_t status, double seconds) {
  const double value = seconds > 0 ? seconds : 0.0;
  // The first bound >= value, as Python's bisect_left.
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  std::lock_guard<std::mutex> lock(stats_mu_);
  ++stats_.counts[{type, status}];
  auto& hist = stats_.histograms[type];
  if (hist.first.empty()) hist.first.resize(bounds_.size() + 1);
  ++hist.first[bucket];
  hist.second += value;
}

RouterLoop::Stats RouterLoop::Snapshot() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

}  // namespace lmcache_cpp::bindings::wire
