// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/redis_adapter.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "lmcache_cpp/logging.h"
#include "redis/cluster.h"
#include "redis/connection.h"
#include "redis/resp.h"
#include "redis/url.h"
#include "redis/value.h"

namespace lmcache_cpp {
namespace {

using redis::Arg;
using redis::ClusterClient;
using redis::Connection;
using redis::Reply;
using redis::Request;
using redis::StoreKey;
using redis::ValueCheck;
using DoneFn = std::function<void(const Status&, const Bitmap&)>;

enum class OpKind : uint8_t { kStore, kLookup, kLoad };

struct Call {
  OpKind kind = OpKind::kLookup;
  std::vector<ObjectKey> keys;
  std::vector<ConstBuffer> in;
  std::vector<MutableBuffer> out;
  DoneFn done;
  uint64_t bytes = 0;  // store payload bytes counted against the in-flight bound
  // Settled at submit (a refused store, mismatched buffers): a worker completes it at once with
  // `status` and no bit set, so no callback runs on the submitting thread.
  bool settled = false;
  Status status;
};

// One worker's way to the servers: a connection (standalone) or a cluster client, used by that
// worker only. Reports the counters it moved since the last call.
class Link {
 public:
  Link(const redis::Endpoint& endpoint, const redis::ConnectionOptions& options, bool cluster) {
    if (cluster) {
      redis::ClusterOptions co;
      co.connection = options;
      cluster_ = std::make_unique<ClusterClient>(std::vector<redis::Endpoint>{endpoint}, co);
    } else {
      conn_ = std::make_unique<Connection>(endpoint, options);
    }
  }

  void Execute(const std::vector<Request>& requests, std::vector<Result<Reply>>* results) {
    if (cluster_ != nullptr) {
      cluster_->Execute(requests.data(), requests.size(), results);
      return;
    }
    std::vector<Reply> replies;
    const Status st = conn_->Execute(requests, &replies);
    results->clear();
    results->reserve(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      if (st.ok()) {
        results->emplace_back(std::move(replies[i]));
      } else {
        results->emplace_back(st);
      }
    }
  }

  // Adds what changed since the last call to `out`.
  void TakeCounters(RedisAdapterStats* out) {
    if (cluster_ != nullptr) {
      const redis::ClusterStats& s = cluster_->stats();
      out->moved += s.moved - seen_moved_;
      out->ask += s.ask - seen_ask_;
      seen_moved_ = s.moved;
      seen_ask_ = s.ask;
      return;  // the cluster client does not report its nodes' connects
    }
    // Every connect but a first one that no failure preceded is a reconnect.
    const redis::ConnectionStats& s = conn_->stats();
    uint64_t fresh = s.connects - seen_connects_;
    if (seen_connects_ == 0 && fresh > 0 && s.connect_failures == 0 && s.failures == 0) --fresh;
    out->reconnects += fresh;
    seen_connects_ = s.connects;
  }

 private:
  std::unique_ptr<Connection> conn_;
  std::unique_ptr<ClusterClient> cluster_;
  uint64_t seen_moved_ = 0, seen_ask_ = 0, seen_connects_ = 0;
};

// The per-call memory of one pipeline: each key's Redis key, value header and request, and the
// results. The requests point into the keys and headers, so it is built in place, never copied.
struct Pipeline {
  explicit Pipeline(size_t n) : heads(n), keys(n), requests(n) {}
  Pipeline(Pipeline&&) = default;
  Pipeline& operator=(Pipeline&&) = default;

  std::vector<std::array<uint8_t, redis::kValueHeaderSize>> heads;
  std::vector<StoreKey> keys;
  std::vector<Request> requests;
  std::vector<Result<Reply>> results;
};

}  // namespace

class RedisL2Adapter::Impl {
 public:
  Impl(RedisAdapterOptions options, redis::Endpoint endpoint, redis::ConnectionOptions conn,
       int interrupt_fd)
      : options_(std::move(options)),
        endpoint_(std::move(endpoint)),
        conn_(std::move(conn)),
        interrupt_fd_(interrupt_fd),
        ns_(redis::MakeNamespaceDigest(options_.namespace_name, "lmcache_cpp objects", "")) {
    conn_.interrupt_fd = interrupt_fd_;
    for (size_t i = 0; i < options_.connections_per_node; ++i) {
      workers_.emplace_back([this, i] { WorkerLoop(i); });
    }
  }

  ~Impl() {
    Close();
    ::close(interrupt_fd_);
  }

  std::string name() const {
    return std::string(options_.cluster ? "redis-cluster:" : "redis:") + endpoint_.ToString();
  }

  void Submit(OpKind kind, std::vector<ObjectKey> keys, std::vector<ConstBuffer> in,
              std::vector<MutableBuffer> out, DoneFn done) {
    Call call;
    call.kind = kind;
    const size_t buffers = kind == OpKind::kStore ? in.size() : out.size();
    if (kind != OpKind::kLookup && buffers != keys.size()) {
      call.settled = true;
      call.status = Status::InvalidArgument("keys and buffers differ in length");
    }
    call.keys = std::move(keys);
    call.in = std::move(in);
    call.out = std::move(out);
    call.done = std::move(done);
    std::unique_lock<std::mutex> lock(mu_);
    if (closed_) {
      lock.unlock();
      call.done(Status::Unavailable("redis adapter closed"), Bitmap(call.keys.size()));
      return;
    }
    if (call.kind == OpKind::kStore && !call.settled) {
      for (const ConstBuffer& b : call.in) call.bytes += b.size;
      if (inflight_store_bytes_ + call.bytes > options_.max_inflight_store_bytes) {
        // Completed at once by a worker, ahead of the queued stores.
        call.settled = true;
        call.bytes = 0;
        reads_.push_back(std::move(call));
      } else {
        inflight_store_bytes_ += call.bytes;
        writes_.push_back(std::move(call));
      }
    } else {
      reads_.push_back(std::move(call));
    }
    lock.unlock();
    cv_.notify_all();
  }

  void Close() {
    std::deque<Call> cancelled;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return;
      closed_ = true;
      cancelled.swap(reads_);
      for (Call& c : writes_) cancelled.push_back(std::move(c));
      writes_.clear();
    }
    const uint64_t one = 1;
    if (::write(interrupt_fd_, &one, sizeof(one)) < 0) {
      Log(LogLevel::kWarning, name() + ": cannot wake workers (eventfd write failed)");
    }
    cv_.notify_all();
    for (Call& c : cancelled) {
      Finish(&c, Status::Cancelled("redis adapter closed"), Bitmap(c.keys.size()));
    }
    for (std::thread& t : workers_) t.join();
    workers_.clear();
  }

  L2AdapterStats stats() const {
    L2AdapterStats s;
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      s = stats_;
    }
    std::lock_guard<std::mutex> lock(mu_);
    s.in_flight = reads_.size() + writes_.size() + running_;
    return s;
  }

  RedisAdapterStats redis_stats() const {
    RedisAdapterStats s;
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      s = redis_;
    }
    std::lock_guard<std::mutex> lock(mu_);
    s.inflight_store_bytes = inflight_store_bytes_;
    return s;
  }

  StoreKey Key(const ObjectKey& key) const {
    return redis::MakeStoreKey(options_.key_prefix, ns_, key);
  }

  // A pipeline for the call, with the Redis key of each of its keys.
  Pipeline Plan(const Call& call) const {
    Pipeline p(call.keys.size());
    for (size_t i = 0; i < call.keys.size(); ++i) p.keys[i] = Key(call.keys[i]);
    return p;
  }

 private:
  void WorkerLoop(size_t index) {
    Link link(endpoint_, conn_, options_.cluster);
    // Worker 0 serves lookups and loads only, so write-back never delays them.
    const bool takes_stores = index != 0;
    for (;;) {
      Call call;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock,
                 [&] { return closed_ || !reads_.empty() || (takes_stores && !writes_.empty()); });
        if (closed_) return;
        if (!reads_.empty()) {
          call = std::move(reads_.front());
          reads_.pop_front();
        } else {
          call = std::move(writes_.front());
          writes_.pop_front();
        }
        ++running_;
      }
      Bitmap bits(call.keys.size());
      RedisAdapterStats delta;
      L2AdapterStats base;
      if (call.settled) {
        if (call.kind == OpKind::kStore && call.status.ok()) {
          delta.stores_rejected += call.keys.size();
          base.store_failures += call.keys.size();
        }
      } else if (call.kind == OpKind::kStore) {
        RunStore(&link, call, &bits, &base, &delta);
      } else if (call.kind == OpKind::kLookup) {
        RunLookup(&link, call, &bits, &base, &delta);
      } else {
        RunLoad(&link, call, &bits, &base, &delta);
      }
      link.TakeCounters(&delta);
      AddStats(base, delta);
      {
        std::lock_guard<std::mutex> lock(mu_);
        --running_;
      }
      Finish(&call, call.status, bits);
    }
  }

  // Releases the call's in-flight bytes, then runs its callback with no lock held.
  void Finish(Call* call, const Status& status, const Bitmap& bits) {
    if (call->kind == OpKind::kStore) {
      std::lock_guard<std::mutex> lock(mu_);
      inflight_store_bytes_ -= call->bytes;
    }
    call->done(status, bits);
  }

  // Counts a per-key failure that is not a reply of the expected kind.
  static bool NodeFailed(const Result<Reply>& r, RedisAdapterStats* delta) {
    if (r.ok() && !r->is_error()) return false;
    ++delta->node_errors;
    return true;
  }

  void RunStore(Link* link, const Call& call, Bitmap* bits, L2AdapterStats* base,
                RedisAdapterStats* delta) {
    const size_t n = call.keys.size();
    Pipeline p = Plan(call);
    for (size_t i = 0; i < n; ++i) {
      const ConstBuffer& b = call.in[i];
      const uint32_t crc = b.has_crc32c ? b.crc32c : PayloadCrc32c(b.data, b.size);
      uint8_t* head = p.heads[i].data();
      redis::EncodeValueHeader(head, ns_.fingerprint(), b.size, crc);
      p.requests[i] = Request::Of(
          {"SET", p.keys[i].view(), Arg::Pieces(head, redis::kValueHeaderSize, b.data, b.size)});
    }
    link->Execute(p.requests, &p.results);
    const std::vector<Result<Reply>>& results = p.results;
    for (size_t i = 0; i < n; ++i) {
      if (NodeFailed(results[i], delta) || !results[i]->IsStatus("OK")) {
        ++base->store_failures;
        continue;
      }
      bits->Set(i);
      ++base->stores;
      base->bytes_written += call.in[i].size;
    }
  }

  void RunLookup(Link* link, const Call& call, Bitmap* bits, L2AdapterStats* base,
                 RedisAdapterStats* delta) {
    const size_t n = call.keys.size();
    Pipeline p = Plan(call);
    for (size_t i = 0; i < n; ++i) p.requests[i] = Request::Of({"EXISTS", p.keys[i].view()});
    link->Execute(p.requests, &p.results);
    const std::vector<Result<Reply>>& results = p.results;
    base->lookups += n;
    for (size_t i = 0; i < n; ++i) {
      if (NodeFailed(results[i], delta)) continue;
      if (results[i]->type == redis::ReplyType::kInteger && results[i]->integer > 0) bits->Set(i);
    }
  }

  void RunLoad(Link* link, const Call& call, Bitmap* bits, L2AdapterStats* base,
               RedisAdapterStats* delta) {
    const size_t n = call.keys.size();
    Pipeline p = Plan(call);
    for (size_t i = 0; i < n; ++i) {
      const redis::BulkSink sink{p.heads[i].data(), redis::kValueHeaderSize, call.out[i].data,
                                 call.out[i].size};
      p.requests[i] = Request::Of({"GET", p.keys[i].view()}).Into(sink);
    }
    link->Execute(p.requests, &p.results);
    const std::vector<Result<Reply>>& results = p.results;
    for (size_t i = 0; i < n; ++i) {
      const MutableBuffer& out = call.out[i];
      if (NodeFailed(results[i], delta)) {
        ++base->load_misses;
        continue;
      }
      const Reply& reply = *results[i];
      if (reply.is_null()) {
        ++base->load_misses;
        ++delta->misses_absent;
        ++delta->gone_after_lookup;
        continue;
      }
      ValueCheck check = ValueCheck::kForeign;
      if (reply.type == redis::ReplyType::kBulkString) {
        const bool filled = reply.sink == redis::SinkOutcome::kFilled;
        check = redis::CheckValue(p.heads[i].data(),
                                  filled ? redis::kValueHeaderSize + out.size : reply.length,
                                  ns_.fingerprint(), out.size, filled ? out.data : nullptr);
      }
      if (check == ValueCheck::kOk) {
        bits->Set(i);
        ++base->loads;
        base->bytes_read += out.size;
        continue;
      }
      ++base->load_misses;
      switch (check) {
        case ValueCheck::kTruncated:
          ++delta->misses_truncated;
          ++base->corrupt_reads;
          break;
        case ValueCheck::kTorn:
          ++delta->misses_torn;
          ++base->corrupt_reads;
          break;
        case ValueCheck::kCorrupt:
          ++delta->misses_corrupt;
          ++base->corrupt_reads;
          break;
        case ValueCheck::kForeign: ++delta->misses_foreign; break;
        case ValueCheck::kWrongSize:
        case ValueCheck::kOk: ++delta->misses_wrong_size; break;
      }
    }
  }

  void AddStats(const L2AdapterStats& b, const RedisAdapterStats& d) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    stats_.stores += b.stores;
    stats_.store_failures += b.store_failures;
    stats_.lookups += b.lookups;
    stats_.loads += b.loads;
    stats_.load_misses += b.load_misses;
    stats_.corrupt_reads += b.corrupt_reads;
    stats_.bytes_written += b.bytes_written;
    stats_.bytes_read += b.bytes_read;
    redis_.misses_absent += d.misses_absent;
    redis_.misses_truncated += d.misses_truncated;
    redis_.misses_torn += d.misses_torn;
    redis_.misses_foreign += d.misses_foreign;
    redis_.misses_wrong_size += d.misses_wrong_size;
    redis_.misses_corrupt += d.misses_corrupt;
    redis_.gone_after_lookup += d.gone_after_lookup;
    redis_.node_errors += d.node_errors;
    redis_.reconnects += d.reconnects;
    redis_.moved += d.moved;
    redis_.ask += d.ask;
    redis_.stores_rejected += d.stores_rejected;
  }

  const RedisAdapterOptions options_;
  const redis::Endpoint endpoint_;
  redis::ConnectionOptions conn_;
  const int interrupt_fd_;
  const redis::NamespaceDigest ns_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Call> reads_, writes_;
  size_t running_ = 0;
  uint64_t inflight_store_bytes_ = 0;
  bool closed_ = false;
  std::vector<std::thread> workers_;

  mutable std::mutex stats_mu_;
  L2AdapterStats stats_;
  RedisAdapterStats redis_;
};

Result<std::unique_ptr<RedisL2Adapter>> RedisL2Adapter::Create(RedisAdapterOptions options) {
  Result<redis::RedisUrl> url = redis::ParseRedisUrl(options.url);
  if (!url.ok()) return url.status();
  LMCACHE_RETURN_IF_ERROR(redis::ValidateKeyPrefix(options.key_prefix));
  if (options.connections_per_node < 2 || options.connections_per_node > 64) {
    return Status::InvalidArgument("redis adapter: connections_per_node must be in [2, 64]");
  }
  if (options.connect_timeout_ms == 0 || options.op_timeout_ms == 0) {
    return Status::InvalidArgument("redis adapter: timeouts must be positive");
  }
  if (options.max_inflight_store_bytes == 0) {
    return Status::InvalidArgument("redis adapter: max_inflight_store_bytes must be positive");
  }
  if (options.cluster && url->db != 0) {
    return Status::InvalidArgument("redis adapter: a cluster has only database 0");
  }
  redis::ConnectionOptions conn;
  conn.tls = url->tls;
  conn.tls_ca_file = options.tls_ca_file;
  conn.tls_cert_file = options.tls_cert_file;
  conn.tls_key_file = options.tls_key_file;
  conn.username = options.username.empty() ? url->username : options.username;
  conn.password = options.password.empty() ? url->password : options.password;
  conn.db = url->db;
  conn.connect_timeout = std::chrono::milliseconds(options.connect_timeout_ms);
  conn.op_timeout = std::chrono::milliseconds(options.op_timeout_ms);

  // One connection now: wrong credentials or TLS files stop start-up; an unreachable server
  // only warns (the workers connect as traffic comes).
  const std::string where = "redis adapter " + url->endpoint.ToString();
  {
    Connection probe(url->endpoint, conn);
    const Status st = probe.Connect();
    if (st.code() == StatusCode::kPermissionDenied || st.code() == StatusCode::kInvalidArgument ||
        st.code() == StatusCode::kNotSupported) {
      return st;
    }
    if (!st.ok()) {
      Log(LogLevel::kWarning, where + ": not reachable at start-up (" + st.ToString() +
                                  "); serving from L1 until it is");
    } else {
      Result<Reply> policy = probe.Command({"CONFIG", "GET", "maxmemory-policy"});
      if (policy.ok() && policy->elements.size() == 2 && policy->elements[1].str == "noeviction") {
        Log(LogLevel::kWarning,
            where +
                ": maxmemory-policy is noeviction; stores will fail once Redis is full "
                "(recommended: allkeys-lru)");
      }
    }
  }
  const int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return Status::FromErrno(errno, "redis adapter: eventfd");
  redis::Endpoint endpoint = url->endpoint;
  auto impl = std::make_unique<Impl>(std::move(options), std::move(endpoint), std::move(conn), efd);
  return std::unique_ptr<RedisL2Adapter>(new RedisL2Adapter(std::move(impl)));
}

RedisL2Adapter::RedisL2Adapter(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RedisL2Adapter::~RedisL2Adapter() = default;

std::string RedisL2Adapter::name() const { return impl_->name(); }

void RedisL2Adapter::SubmitStore(std::vector<ObjectKey> keys, std::vector<ConstBuffer> buffers,
                                 StoreCallback done) {
  impl_->Submit(OpKind::kStore, std::move(keys), std::move(buffers), {}, std::move(done));
}

void RedisL2Adapter::SubmitLookupAndPin(std::vector<ObjectKey> keys, LookupCallback done) {
  impl_->Submit(OpKind::kLookup, std::move(keys), {}, {}, std::move(done));
}

void RedisL2Adapter::SubmitLoad(std::vector<ObjectKey> keys, std::vector<MutableBuffer> buffers,
                                LoadCallback done) {
  impl_->Submit(OpKind::kLoad, std::move(keys), {}, std::move(buffers), std::move(done));
}

void RedisL2Adapter::Unpin(const std::vector<ObjectKey>& /*keys*/) {}  // Redis has no pins

void RedisL2Adapter::Close() { impl_->Close(); }

L2AdapterStats RedisL2Adapter::stats() const { return impl_->stats(); }
RedisAdapterStats RedisL2Adapter::redis_stats() const { return impl_->redis_stats(); }

std::string RedisL2Adapter::KeyFor(const ObjectKey& key) const {
  return std::string(impl_->Key(key).view());
}

}  // namespace lmcache_cpp
