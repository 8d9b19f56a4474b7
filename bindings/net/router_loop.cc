// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "router_loop.h"

#include <time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>

namespace lmcache_cpp::bindings::net {

namespace {

constexpr auto kInternal = static_cast<uint32_t>(StatusCode::kInternal);

double MonotonicSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

}  // namespace

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

RouterLoop::Drained RouterLoop::Drain(size_t max_messages, bool trace) {
  Drained out(&zmq_);
  Message message(&zmq_);
  while (out.answered < max_messages) {
    int error = 0;
    if (!ReceiveMessage(zmq_, socket_, &message, &error)) {
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
    std::optional<Reply> reply;
    try {
      reply = path_->Handle(client->second.id, message.frame(1), message.frame(2));
    } catch (const std::exception&) {
      // FastPath answers its own failures; anything else goes to the Python path, which words
      // an error reply. The loop itself never stops on a request.
      reply.reset();
    }
    if (!reply.has_value()) {
      out.unhandled = std::move(message);
      out.tried = true;
      return out;
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - received).count();
    Record(reply->request_type, reply->status, seconds);
    if (trace) {
      out.traces.push_back(
          {client->second.id, reply->request_type, reply->seq, reply->status, seconds});
    }
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
    const std::string_view frames[] = {identity, reply->header, reply->payload};
    if (SendMessage(zmq_, socket_, frames, 3) != 0) {
      std::lock_guard<std::mutex> lock(stats_mu_);
      ++stats_.dropped_replies;
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

}  // namespace lmcache_cpp::bindings::net
