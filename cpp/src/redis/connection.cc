// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "redis/connection.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <utility>

namespace lmcache_cpp {
namespace redis {

struct Connection::Tls {
  SSL_CTX* ctx = nullptr;
  SSL* ssl = nullptr;
  ~Tls() {
    if (ssl != nullptr) SSL_free(ssl);
    if (ctx != nullptr) SSL_CTX_free(ctx);
  }
};

namespace {

// OpenSSL writes with write(2), which raises SIGPIPE on a socket the peer closed. Blocks SIGPIPE
// on this thread for the scope and swallows one raised inside it, so the library never changes
// the process's signal disposition (an embedding host may not ignore SIGPIPE).
class ScopedSigpipeBlock {
 public:
  ScopedSigpipeBlock() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGPIPE);
    sigset_t pending;
    sigemptyset(&pending);
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &set_, &old_);
  }
  ~ScopedSigpipeBlock() {
    if (!was_pending_) {
      sigset_t pending;
      sigemptyset(&pending);
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        const timespec zero{0, 0};
        sigtimedwait(&set_, nullptr, &zero);
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  ScopedSigpipeBlock(const ScopedSigpipeBlock&) = delete;
  ScopedSigpipeBlock& operator=(const ScopedSigpipeBlock&) = delete;

 private:
  sigset_t set_, old_;
  bool was_pending_ = false;
};

std::string OpenSslError() {
  std::string out;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "unknown OpenSSL error" : out;
}

bool IsIpAddress(const std::string& host) {
  in6_addr a6;
  in_addr a4;
  return inet_pton(AF_INET, host.c_str(), &a4) == 1 || inet_pton(AF_INET6, host.c_str(), &a6) == 1;
}

// Milliseconds until `deadline`, rounded up; 0 when it has passed.
int RemainingMs(std::chrono::steady_clock::time_point deadline) {
  const auto left = deadline - std::chrono::steady_clock::now();
  if (left <= std::chrono::steady_clock::duration::zero()) return 0;
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(left).count() + 1;
  return static_cast<int>(std::min<int64_t>(ms, INT_MAX));
}

// Waits for `events` on fd until the deadline. False when the deadline passed first, or when
// `interrupt` (a descriptor, -1 for none) became readable.
bool WaitFor(int fd, short events, std::chrono::steady_clock::time_point deadline, int interrupt) {
  for (;;) {
    const int ms = RemainingMs(deadline);
    if (ms == 0) return false;
    pollfd p[2] = {{fd, events, 0}, {interrupt, POLLIN, 0}};
    const int r = poll(p, interrupt >= 0 ? 2 : 1, ms);
    if (r > 0) return p[1].revents == 0;
    if (r == 0) continue;             // re-check the clock: poll may wake early
    if (errno != EINTR) return true;  // let the I/O call report the error
  }
}

}  // namespace

std::string_view ErrorCode(const Reply& reply) {
  if (!reply.is_error()) return {};
  const std::string_view s(reply.str);
  return s.substr(0, s.find(' '));
}

Connection::Connection(Endpoint endpoint, ConnectionOptions options)
    : endpoint_(std::move(endpoint)), options_(std::move(options)), reader_(options_.limits) {}

Connection::~Connection() { Close(); }

std::string Connection::Where() const {
  return std::string(options_.tls ? "rediss://" : "redis://") + endpoint_.ToString();
}

void Connection::Close() {
  tls_.reset();
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  reader_.Reset();
}

Status Connection::Fail(Status status) {
  Close();
  return status;
}

Status Connection::ConnectTcp(Clock::time_point deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(endpoint_.port);
  const int gai = getaddrinfo(endpoint_.host.c_str(), port.c_str(), &hints, &res);
  if (gai != 0) {
    return Status::Unavailable(Where() + ": cannot resolve host: " + gai_strerror(gai));
  }
  Status last = Status::Unavailable(Where() + ": no address");
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    const int fd =
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last = Status::FromErrno(errno, Where() + ": socket");
      continue;
    }
    int err = 0;
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
      err = errno;
      if (err == EINPROGRESS) {
        if (!WaitFor(fd, POLLOUT, deadline, options_.interrupt_fd)) {
          ::close(fd);
          last = Status::Timeout(Where() + ": connect timed out after " +
                                 std::to_string(options_.connect_timeout.count()) + " ms");
          break;
        }
        socklen_t len = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      }
    }
    if (err != 0) {
      ::close(fd);
      last = Status::Unavailable(Where() + ": connect: " + std::strerror(err));
      continue;
    }
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    fd_ = fd;
    last = Status::Ok();
    break;
  }
  freeaddrinfo(res);
  if (!last.ok() || !options_.tls) return last;

  // TLS: a context per connection (cheap next to a handshake; options may differ per node).
  tls_ = std::make_unique<Tls>();
  tls_->ctx = SSL_CTX_new(TLS_client_method());
  if (tls_->ctx == nullptr) return Status::NotSupported("TLS context: " + OpenSslError());
  SSL_CTX_set_min_proto_version(tls_->ctx, TLS1_2_VERSION);
  SSL_CTX_set_mode(tls_->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (options_.tls_verify_peer) {
    SSL_CTX_set_verify(tls_->ctx, SSL_VERIFY_PEER, nullptr);
    const int ok =
        options_.tls_ca_file.empty()
            ? SSL_CTX_set_default_verify_paths(tls_->ctx)
            : SSL_CTX_load_verify_locations(tls_->ctx, options_.tls_ca_file.c_str(), nullptr);
    if (ok != 1) {
      return Status::InvalidArgument("TLS CA '" + options_.tls_ca_file + "': " + OpenSslError());
    }
  } else {
    SSL_CTX_set_verify(tls_->ctx, SSL_VERIFY_NONE, nullptr);
  }
  if (!options_.tls_cert_file.empty()) {
    if (SSL_CTX_use_certificate_chain_file(tls_->ctx, options_.tls_cert_file.c_str()) != 1 ||
        SSL_CTX_use_PrivateKey_file(tls_->ctx, options_.tls_key_file.c_str(), SSL_FILETYPE_PEM) !=
            1) {
      return Status::InvalidArgument("TLS client certificate '" + options_.tls_cert_file +
                                     "': " + OpenSslError());
    }
  }
  tls_->ssl = SSL_new(tls_->ctx);
  if (tls_->ssl == nullptr || SSL_set_fd(tls_->ssl, fd_) != 1) {
    return Status::NotSupported("TLS session: " + OpenSslError());
  }
  const std::string& name =
      options_.tls_server_name.empty() ? endpoint_.host : options_.tls_server_name;
  if (IsIpAddress(name)) {
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(tls_->ssl), name.c_str());
  } else {
    SSL_set_tlsext_host_name(tls_->ssl, name.c_str());
    SSL_set1_host(tls_->ssl, name.c_str());
  }
  SSL_set_connect_state(tls_->ssl);
  for (;;) {
    ERR_clear_error();
    int r;
    {
      ScopedSigpipeBlock no_sigpipe;
      r = SSL_do_handshake(tls_->ssl);
    }
    if (r == 1) return Status::Ok();
    const int e = SSL_get_error(tls_->ssl, r);
    short want = 0;
    if (e == SSL_ERROR_WANT_READ) want = POLLIN;
    if (e == SSL_ERROR_WANT_WRITE) want = POLLOUT;
    if (want == 0) {
      const long v = SSL_get_verify_result(tls_->ssl);
      std::string why = v != X509_V_OK
                            ? std::string("certificate: ") + X509_verify_cert_error_string(v)
                            : OpenSslError();
      return Status::Unavailable(Where() + ": TLS handshake failed: " + why);
    }
    if (!WaitFor(fd_, want, deadline, options_.interrupt_fd)) {
      return Status::Timeout(Where() + ": TLS handshake timed out");
    }
  }
}

Status Connection::Handshake(Clock::time_point deadline) {
  std::vector<Request> reqs;
  const std::string db = std::to_string(options_.db);
  const std::string user = options_.username.empty() ? "default" : options_.username;
  if (options_.protocol == 3) {
    if (!options_.password.empty()) {
      reqs.push_back(Request::Of({"HELLO", "3", "AUTH", user, options_.password}));
    } else {
      reqs.push_back(Request::Of({"HELLO", "3"}));
    }
  } else if (!options_.password.empty()) {
    reqs.push_back(options_.username.empty()
                       ? Request::Of({"AUTH", options_.password})
                       : Request::Of({"AUTH", options_.username, options_.password}));
  }
  if (options_.db != 0) reqs.push_back(Request::Of({"SELECT", db}));
  if (reqs.empty()) return Status::Ok();
  batch_.Clear();
  for (const Request& r : reqs) {
    batch_.Append(r);
    reader_.Expect(nullptr);
  }
  std::vector<Reply> replies;
  LMCACHE_RETURN_IF_ERROR(Exchange(&batch_, reqs.size(), &replies, deadline, "handshake"));
  for (size_t i = 0; i < replies.size(); ++i) {
    if (!replies[i].is_error()) continue;
    const std::string cmd(reinterpret_cast<const char*>(reqs[i].args[0].data),
                          reqs[i].args[0].size);
    const std::string_view code = ErrorCode(replies[i]);
    std::string msg = Where() + ": " + cmd + " refused: " + replies[i].str;
    if (code == "WRONGPASS" || code == "NOAUTH" || code == "NOPERM" ||
        (cmd == "AUTH" && code == "ERR")) {
      return Status::PermissionDenied(std::move(msg) + " (check the username and password)");
    }
    if (cmd == "HELLO") return Status::NotSupported(std::move(msg) + " (RESP3 needs Redis 6+)");
    return Status::InvalidArgument(std::move(msg));
  }
  return Status::Ok();
}

Status Connection::Connect() {
  if (connected()) return Status::Ok();
  const Clock::time_point now = Clock::now();
  if (now < retry_after_) {
    return Status(
        last_connect_error_.code(),
        last_connect_error_.message() + " (not retried for " +
            std::to_string(
                std::chrono::duration_cast<std::chrono::milliseconds>(retry_after_ - now).count()) +
            " ms)");
  }
  const Clock::time_point deadline = now + options_.connect_timeout;
  reader_.Reset();
  Status st = ConnectTcp(deadline);
  if (st.ok()) st = Handshake(deadline);
  if (!st.ok()) {
    Close();
    ++stats_.connect_failures;
    retry_after_ = Clock::now() + options_.reconnect_backoff;
    last_connect_error_ = st;
    return st;
  }
  ++stats_.connects;
  return Status::Ok();
}

bool Connection::WriteSome(const std::vector<iovec>& iov, size_t* index, size_t* offset,
                           bool* progressed, short* want, Status* status) {
  if (tls_ != nullptr) {
    const iovec& v = iov[*index];
    const size_t len = std::min<size_t>(v.iov_len - *offset, INT_MAX);
    ERR_clear_error();
    int r;
    {
      ScopedSigpipeBlock no_sigpipe;
      r = SSL_write(tls_->ssl, static_cast<const uint8_t*>(v.iov_base) + *offset,
                    static_cast<int>(len));
    }
    if (r > 0) {
      *progressed = true;
      stats_.bytes_sent += static_cast<uint64_t>(r);
      *offset += static_cast<size_t>(r);
      if (*offset == v.iov_len) {
        ++*index;
        *offset = 0;
      }
      return true;
    }
    const int e = SSL_get_error(tls_->ssl, r);
    if (e == SSL_ERROR_WANT_WRITE) *want |= POLLOUT;
    if (e == SSL_ERROR_WANT_READ) *want |= POLLIN;
    if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) return true;
    *status = Status::IoError(Where() + ": TLS write: " + OpenSslError());
    return false;
  }
  constexpr size_t kMaxIov = 64;
  iovec local[kMaxIov];
  size_t k = 0;
  for (size_t i = *index; i < iov.size() && k < kMaxIov; ++i, ++k) local[k] = iov[i];
  local[0].iov_base = static_cast<uint8_t*>(local[0].iov_base) + *offset;
  local[0].iov_len -= *offset;
  msghdr msg{};
  msg.msg_iov = local;
  msg.msg_iovlen = k;
  ssize_t n;
  do {
    n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      *want |= POLLOUT;
      return true;
    }
    *status = Status::FromErrno(errno, Where() + ": send");
    return false;
  }
  *progressed = true;
  stats_.bytes_sent += static_cast<uint64_t>(n);
  size_t left = static_cast<size_t>(n);
  while (left > 0) {
    const size_t in_seg = iov[*index].iov_len - *offset;
    if (left < in_seg) {
      *offset += left;
      break;
    }
    left -= in_seg;
    ++*index;
    *offset = 0;
  }
  return true;
}

bool Connection::ReadSome(bool* progressed, bool* eof, short* want, Status* status) {
  iovec targets[2];
  const int k = reader_.ReadTargets(targets);
  ssize_t n;
  if (tls_ != nullptr) {
    ERR_clear_error();
    const int r = SSL_read(tls_->ssl, targets[0].iov_base,
                           static_cast<int>(std::min<size_t>(targets[0].iov_len, INT_MAX)));
    if (r <= 0) {
      const int e = SSL_get_error(tls_->ssl, r);
      if (e == SSL_ERROR_WANT_READ) *want |= POLLIN;
      if (e == SSL_ERROR_WANT_WRITE) *want |= POLLOUT;
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        reader_.Commit(0);
        return true;
      }
      reader_.Commit(0);
      if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)) {
        *eof = true;
        return true;
      }
      *status = Status::IoError(Where() + ": TLS read: " + OpenSslError());
      return false;
    }
    n = r;
  } else {
    do {
      n = ::readv(fd_, targets, k);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      reader_.Commit(0);
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        *want |= POLLIN;
        return true;
      }
      *status = Status::FromErrno(errno, Where() + ": recv");
      return false;
    }
    if (n == 0) {
      reader_.Commit(0);
      *eof = true;
      return true;
    }
  }
  const uint64_t before = reader_.direct_bytes();
  reader_.Commit(static_cast<size_t>(n));
  stats_.direct_bytes += reader_.direct_bytes() - before;
  stats_.bytes_received += static_cast<uint64_t>(n);
  *progressed = true;
  return true;
}

Status Connection::Exchange(EncodedBatch* batch, size_t n_replies, std::vector<Reply>* replies,
                            Clock::time_point deadline, const char* what) {
  const std::vector<iovec>& iov = batch->iovecs();
  size_t index = 0, offset = 0;
  replies->clear();
  replies->reserve(n_replies);
  auto progress_note = [&]() {
    return std::string(" (") + what + ": " + std::to_string(replies->size()) + " of " +
           std::to_string(n_replies) + " replies received)";
  };
  while (replies->size() < n_replies) {
    bool progressed = false, eof = false;
    short want = 0;
    Status st;
    if (index < iov.size() && !WriteSome(iov, &index, &offset, &progressed, &want, &st)) {
      return Fail(Status(st.code(), st.message() + progress_note()));
    }
    if (!ReadSome(&progressed, &eof, &want, &st)) {
      return Fail(Status(st.code(), st.message() + progress_note()));
    }
    for (;;) {
      Reply r;
      Result<bool> got = reader_.Next(&r);
      if (!got.ok()) {
        return Fail(
            Status(got.status().code(), Where() + ": " + got.status().message() + progress_note()));
      }
      if (!*got) break;
      if (r.type == ReplyType::kPush) continue;  // out-of-band (RESP3); not a command's reply
      replies->push_back(std::move(r));
      if (replies->size() == n_replies) break;
    }
    if (replies->size() == n_replies) break;
    if (eof)
      return Fail(Status::IoError(Where() + ": server closed the connection" + progress_note()));
    if (!progressed) {
      if (want == 0) want = POLLIN;
      if (!WaitFor(fd_, want, deadline, options_.interrupt_fd)) {
        return Fail(Status::Timeout(Where() + ": no reply within the timeout" + progress_note()));
      }
    }
  }
  return Status::Ok();
}

Status Connection::Execute(const Request* requests, size_t n, std::vector<Reply>* replies) {
  ++stats_.batches;
  stats_.commands += n;
  replies->clear();
  if (n == 0) return Status::Ok();
  Status st = Connect();
  if (!st.ok()) {
    ++stats_.failures;
    return st;
  }
  batch_.Clear();
  for (size_t i = 0; i < n; ++i) {
    batch_.Append(requests[i]);
    reader_.Expect(requests[i].has_sink ? &requests[i].sink : nullptr);
  }
  st = Exchange(&batch_, n, replies, Clock::now() + options_.op_timeout, "batch");
  if (!st.ok()) ++stats_.failures;
  return st;
}

Result<Reply> Connection::Command(std::initializer_list<Arg> args) {
  const Request r = Request::Of(args);
  std::vector<Reply> replies;
  LMCACHE_RETURN_IF_ERROR(Execute(&r, 1, &replies));
  return std::move(replies[0]);
}

}  // namespace redis
}  // namespace lmcache_cpp
