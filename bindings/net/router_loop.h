// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The cache server's receive loop for the per-prompt requests, in C++: it reads whole messages
// from the server's ROUTER socket, answers the ones wire::FastPath serves and sends their
// replies, all without the GIL, and hands anything else back to the Python socket loop one
// message at a time. Per request that saves the Python side's three receives, three sends and
// bookkeeping, which cost several times the request itself.
//
// The socket is pyzmq's (zmq.Socket.underlying), driven through the libzmq pyzmq loaded
// (libzmq.h); a pyzmq whose libzmq cannot be found leaves the server on its Python loop. That
// coupling to pyzmq's extension module is why this loop lives in bindings/net/ and not in cpp/:
// it drives a socket the Python server owns, through a library only the Python process loaded.
// The codec it runs (cpp/src/wire/fast_path.h) is plain C++ and tested on its own.
//
// The loop knows the clients the Python server has admitted (AddClient/RemoveClient: identity ->
// ClientId) and stamps when each was last heard from; a message from an identity it does not
// know goes to Python, which admits (or refuses) the client. It counts what it answers by request
// type and status, with latency histograms on the bounds the server's metrics use (Stats).
//
// Threading: Drain, AddClient, RemoveClient and LastSeen run on the server's socket thread only
// (the thread that owns the socket); Stats may be called from any thread.

#ifndef LMCACHE_CPP_BINDINGS_NET_ROUTER_LOOP_H_
#define LMCACHE_CPP_BINDINGS_NET_ROUTER_LOOP_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "libzmq.h"
#include "lmcache_cpp/cache_engine.h"
#include "wire/fast_path.h"

namespace lmcache_cpp::bindings::net {

using wire::FastPath;
using wire::Reader;
using wire::Reply;

class RouterLoop {
 public:
  // What one Drain call did.
  struct Drained {
    explicit Drained(const Libzmq* zmq) : unhandled(zmq) {}
    size_t answered = 0;
    // A message (identity frame first) the Python loop must handle; empty when none.
    Message unhandled;
    // Whether FastPath::Handle already looked at `unhandled` (and declined it).
    bool tried = false;
    // Requests answered with an internal error, for the server's log.
    struct Failure {
      ClientId client;
      uint32_t request_type;
      std::string message;
    };
    std::vector<Failure> failures;
    // With Drain(..., trace = true): one entry per answered request, for the server's DEBUG
    // log (the same requests, on the same path, as without it).
    struct Trace {
      ClientId client;
      uint32_t request_type;
      uint64_t seq;
      uint32_t status;
      double seconds;
    };
    std::vector<Trace> traces;
    // A libzmq error that stopped the loop (0: none), as zmq_errno().
    int error = 0;
  };

  // Counts and latency histograms of the answered requests. `counts` by (request type, status);
  // `histograms` by request type: per-bucket counts (len(bounds) + 1, the last is +Inf) and the
  // sum of seconds.
  struct Stats {
    std::map<std::pair<uint32_t, uint32_t>, uint64_t> counts;
    std::map<uint32_t, std::pair<std::vector<uint64_t>, double>> histograms;
    uint64_t dropped_replies = 0;
  };

  // `path` and `socket` must outlive the loop; `bounds` are the histogram's upper bounds in
  // seconds, strictly increasing.
  RouterLoop(const FastPath* path, Libzmq zmq, void* socket, std::vector<double> bounds);

  void AddClient(std::string identity, ClientId id);
  void RemoveClient(const std::string& identity);
  // CLOCK_MONOTONIC seconds (Python's time.monotonic()) when the loop last received a message
  // from the client; nullopt when it has not since AddClient.
  std::optional<double> LastSeen(const std::string& identity) const;

  // Receives and answers queued messages until none is queued, `max_messages` have been
  // answered, or a message needs the Python loop. Never blocks. Call without the GIL. `trace`
  // records each answered request in Drained::traces.
  Drained Drain(size_t max_messages, bool trace = false);

  Stats Snapshot() const;

 private:
  struct Client {
    ClientId id = 0;
    double last_seen = 0;  // 0: not since AddClient
  };
  void Record(uint32_t type, uint32_t status, double seconds);

  const FastPath* path_;
  Libzmq zmq_;
  void* socket_;
  std::vector<double> bounds_;
  std::unordered_map<std::string, Client> clients_;

  mutable std::mutex stats_mu_;
  Stats stats_;  // GUARDED_BY(stats_mu_)
};

}  // namespace lmcache_cpp::bindings::net

#endif  // LMCACHE_CPP_BINDINGS_NET_ROUTER_LOOP_H_
