// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Connection: one client connection to one Redis/Valkey server, plain TCP or TLS (OpenSSL), that
// sends pipelined batches of commands and reads their replies (docs/design/redis.md).
//
// Flow: Execute() connects if needed (TCP connect, TLS handshake, then HELLO/AUTH and SELECT in
// one round trip), writes every command of the batch with sendmsg (payloads straight from the
// caller's memory) while it reads replies as they come (full duplex, so neither side's buffers
// can deadlock a large pipeline), and returns one reply per command, in order. Bulk replies with
// a sink are read straight into the caller's memory (resp.h).
//
// Time: every wait is a poll() with a deadline, never a blocking call. Connecting (TCP, TLS and
// the handshake commands) is bounded by connect_timeout; a batch, from its first byte written to
// its last reply read, by op_timeout. Name resolution (getaddrinfo) is the exception: use
// addresses, or names the resolver answers at once.
//
// Failure: an I/O error, a timeout, a protocol violation or the server closing the socket
// closes the connection (a late reply can never be taken for a later command's) and fails the
// batch: the status says which, and how many replies had arrived. The next Execute reconnects,
// except within reconnect_backoff of a failed connect, when it fails fast with Unavailable (a
// dead node costs one connect timeout per backoff period, not one per batch). Error replies
// ("-ERR ...") are replies, not failures.
//
// Statuses: Unavailable (cannot connect, TLS handshake refused), PermissionDenied (AUTH/HELLO
// refused), Timeout, IoError (reset, closed), Corruption (protocol violation), InvalidArgument
// (SELECT refused, unreadable TLS files), NotSupported (TLS setup, HELLO on an old server). Within
// the backoff a connect fails with the code of the failure that started it.
//
// Thread safety: one thread at a time (a worker owns its connections).
#ifndef LMCACHE_CPP_SRC_REDIS_CONNECTION_H_
#define LMCACHE_CPP_SRC_REDIS_CONNECTION_H_

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "lmcache_cpp/status.h"
#include "redis/resp.h"
#include "redis/url.h"

namespace lmcache_cpp {
namespace redis {

struct ConnectionOptions {
  bool tls = false;
  std::string tls_ca_file;      // PEM bundle to trust; empty: the system's default paths
  std::string tls_cert_file;    // client certificate (PEM) for servers that require one
  std::string tls_key_file;     // its private key (PEM)
  bool tls_verify_peer = true;  // check the chain and that the certificate names the host
  std::string tls_server_name;  // the name to check and send as SNI; empty: the endpoint's host
  std::string username;         // ACL user; empty: the default user
  std::string password;         // empty: no AUTH
  int db = 0;                   // SELECT when non-zero (standalone servers only)
  int protocol = 2;             // 3: HELLO 3 (RESP3); 2: plain RESP2, AUTH if a password is set
  std::chrono::milliseconds connect_timeout{2000};
  std::chrono::milliseconds op_timeout{5000};
  std::chrono::milliseconds reconnect_backoff{1000};
  // A descriptor (e.g. an eventfd) that, once readable, ends every wait at once as a timeout:
  // how an owner shutting down wakes a thread blocked in this connection. -1: none.
  int interrupt_fd = -1;
  ReaderLimits limits;
};

struct ConnectionStats {
  uint64_t connects = 0, connect_failures = 0;
  uint64_t batches = 0, commands = 0, failures = 0;  // failures: batches that failed
  uint64_t bytes_sent = 0, bytes_received = 0;
  uint64_t direct_bytes = 0;  // bulk payload bytes read straight into sinks
};

class Connection {
 public:
  Connection(Endpoint endpoint, ConnectionOptions options);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  const Endpoint& endpoint() const { return endpoint_; }
  bool connected() const { return fd_ >= 0; }

  // Connects and authenticates unless connected. Statuses as above.
  Status Connect();
  // Closes the socket (idempotent). The next Execute reconnects.
  void Close();

  // Sends requests[0, n) pipelined and reads their n replies into `replies` (resized to n), in
  // order; requests with a sink receive a bulk reply into it. On failure `replies` holds the
  // replies that had arrived (a prefix) and the connection is closed.
  Status Execute(const Request* requests, size_t n, std::vector<Reply>* replies);
  Status Execute(const std::vector<Request>& requests, std::vector<Reply>* replies) {
    return Execute(requests.data(), requests.size(), replies);
  }
  // One command.
  Result<Reply> Command(std::initializer_list<Arg> args);

  const ConnectionStats& stats() const { return stats_; }

 private:
  struct Tls;
  using Clock = std::chrono::steady_clock;

  Status ConnectTcp(Clock::time_point deadline);
  Status Handshake(Clock::time_point deadline);
  // Runs one pipelined exchange on the open socket.
  Status Exchange(EncodedBatch* batch, size_t n_replies, std::vector<Reply>* replies,
                  Clock::time_point deadline, const char* what);
  // Writes some bytes; false with *status set on a hard error. Sets *want (POLLIN/POLLOUT) when
  // it would block.
  bool WriteSome(const std::vector<iovec>& iov, size_t* index, size_t* offset, bool* progressed,
                 short* want, Status* status);
  bool ReadSome(bool* progressed, bool* eof, short* want, Status* status);
  Status Fail(Status status);
  std::string Where() const;

  const Endpoint endpoint_;
  const ConnectionOptions options_;
  int fd_ = -1;
  std::unique_ptr<Tls> tls_;
  ReplyReader reader_;
  EncodedBatch batch_;
  Clock::time_point retry_after_{};
  Status last_connect_error_;
  ConnectionStats stats_;
};

// Error replies, for callers: the reply's first word ("MOVED", "ASK", "WRONGPASS", ...).
std::string_view ErrorCode(const Reply& reply);

}  // namespace redis
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_REDIS_CONNECTION_H_
