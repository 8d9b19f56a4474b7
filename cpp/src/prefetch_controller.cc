// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/prefetch_controller.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <random>
#include <utility>

#include "lmcache_cpp/logging.h"

namespace lmcache_cpp {
namespace {

// State of one planned key in the load phase.
enum class KeyState : uint8_t {
  kLoad = 0,    // a temporary L1 object is reserved; the key is loaded from `source`
  kLeased = 1,  // the key appeared in L1 meanwhile and was leased directly
};

// Returns what a job still holds of its `count` leases per key: up to `count`, never more than
// the request holds. A retrieve (or FREE_LOOKUP_LOCKS) of the request may have returned some
// already, and those must not be taken again from leases a newer lookup of the request took.
void ReleaseLeases(ObjectTable* table, RequestId request, const std::vector<ObjectKey>& keys,
                   uint32_t count) {
  if (keys.empty()) return;
  (void)table->ReleaseReadUpTo(request, keys, count);
}

// Aborts the writes; per key when the batch fails (a write lease reaped meanwhile).
void AbortWrites(ObjectTable* table, RequestId writer, const std::vector<ObjectKey>& keys) {
  if (keys.empty()) return;
  if (table->AbortWrite(writer, keys).ok()) return;
  for (const ObjectKey& k : keys) (void)table->AbortWrite(writer, {k});
}

}  // namespace

// ------------------------------------------------------------------------------------------
// JobHandle

std::string JobHandle::ToHex() const {
  static const char kHex[] = "0123456789abcdef";
  std::string s(32, '0');
  for (size_t i = 0; i < bytes.size(); ++i) {
    s[2 * i] = kHex[bytes[i] >> 4];
    s[2 * i + 1] = kHex[bytes[i] & 15];
  }
  return s;
}

Result<JobHandle> JobHandle::FromHex(const std::string& hex) {
  if (hex.size() != 32) return Status::InvalidArgument("job handle must be 32 hex characters");
  JobHandle h;
  for (size_t i = 0; i < 16; ++i) {
    uint8_t v = 0;
    for (size_t j = 0; j < 2; ++j) {
      const char c = hex[2 * i + j];
      uint8_t d;
      if (c >= '0' && c <= '9') {
        d = static_cast<uint8_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        d = static_cast<uint8_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        d = static_cast<uint8_t>(c - 'A' + 10);
      } else {
        return Status::InvalidArgument("job handle must be 32 hex characters");
      }
      v = static_cast<uint8_t>((v << 4) | d);
    }
    h.bytes[i] = v;
  }
  return h;
}

JobHandle JobHandle::Random() {
  JobHandle h;
  size_t got = 0;
  while (got < h.bytes.size()) {
    const ssize_t n = getrandom(h.bytes.data() + got, h.bytes.size() - got, 0);
    if (n > 0) {
      got += static_cast<size_t>(n);
    } else if (n < 0 && errno != EINTR) {
      // No kernel entropy interface: fall back to random_device (still non-sequential).
      std::random_device rd;
      for (size_t i = got; i < h.bytes.size(); ++i) h.bytes[i] = static_cast<uint8_t>(rd());
      got = h.bytes.size();
    }
  }
  return h;
}

size_t JobHandleHash::operator()(const JobHandle& h) const noexcept {
  uint64_t x;
  std::memcpy(&x, h.bytes.data(), sizeof(x));
  return static_cast<size_t>(x);
}

// ------------------------------------------------------------------------------------------
// Job

struct PrefetchController::Job {
  JobHandle handle;
  ClientId client = 0;
  PrefetchRequest req;
  uint32_t count = 1;  // leases per hit: 1 + extra_count
  bool sync = false;
  TimePoint created{};

  // All fields below are GUARDED_BY(PrefetchController::mu_).
  bool queued = false;      // waiting for an in-flight slot
  bool holds_slot = false;  // counted in in_flight_
  bool active = false;      // L2 work outstanding (counted in active_)
  CancelKind cancel = CancelKind::kNone;
  // The L1 prefix leases were returned at the cancel (a superseding lookup of the request must
  // find them gone before it leases): Complete then returns only what the job published.
  bool prefix_released = false;
  bool publishing = false;  // FinishWriteFor in progress (outside the lock)
  bool done = false;        // result available
  PrefetchResult result;
  Status status;

  size_t l1_hits = 0;
  // Lookup phase, over rest = keys[l1_hits:].
  size_t pending = 0;          // adapter callbacks outstanding
  std::vector<Bitmap> pinned;  // per adapter: pins still held
  bool lookup_finished = false;
  bool lookup_timed_out = false;  // sync: answered without L2; late pins are dropped
  size_t planned = 0;
  std::vector<int> source;      // per planned key: adapter index
  bool load_requested = false;  // sync: the load phase was asked for

  // Load phase.
  RequestId internal_request = 0;
  std::vector<KeyState> state;              // per planned key (size = final plan)
  std::vector<std::vector<size_t>> groups;  // per adapter: planned indices loaded from it
  std::vector<Bitmap> loaded;               // per adapter: bit j = groups[a][j] loaded

  std::vector<ObjectKey> Rest(size_t from, size_t n) const {
    const size_t base = l1_hits + from;
    return std::vector<ObjectKey>(req.keys.begin() + static_cast<long>(base),
                                  req.keys.begin() + static_cast<long>(base + n));
  }
  std::vector<ObjectKey> LeasedPrefix(size_t from, size_t to) const {
    return std::vector<ObjectKey>(req.keys.begin() + static_cast<long>(from),
                                  req.keys.begin() + static_cast<long>(to));
  }
};

// ------------------------------------------------------------------------------------------

PrefetchController::PrefetchController(ObjectTable* table,
                                       std::vector<std::shared_ptr<L2Adapter>> adapters,
                                       PrefetchOptions options)
    : table_(table),
      adapters_(std::move(adapters)),
      options_(std::move(options)),
      clock_(options_.clock ? options_.clock : SteadyClock::Default()) {}

PrefetchController::~PrefetchController() {
  Stop();
  std::lock_guard<std::mutex> lock(mu_);
  if (active_ != 0) {
    Log(LogLevel::kError,
        "PrefetchController destroyed with L2 work outstanding; close the adapters first");
  }
}

void PrefetchController::Start() {
  std::lock_guard<std::mutex> lock(start_stop_mu_);
  if (reaper_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopped_) return;
    reaper_stop_ = false;
  }
  reaper_ = std::thread([this] { ReapLoop(); });
}

void PrefetchController::Stop() {
  std::vector<std::pair<std::shared_ptr<Job>, CancelAction>> actions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
    reaper_stop_ = true;
    std::vector<std::shared_ptr<Job>> all;
    all.reserve(jobs_.size());
    for (auto& [h, job] : jobs_) all.push_back(job);
    for (auto& job : all) {
      actions.emplace_back(job, MarkCancelledLocked(job.get(), CancelKind::kCancelled));
    }
  }
  cv_.notify_all();
  reaper_cv_.notify_all();
  for (auto& [job, action] : actions) RunCancelAction(job, action);
  Notice(JobHandle{}, 0);  // stopped: everything changed
  std::lock_guard<std::mutex> lock(start_stop_mu_);
  if (reaper_.joinable()) reaper_.join();
}

bool PrefetchController::WaitIdle(Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout, [this] { return active_ == 0; });
}

// ------------------------------------------------------------------------------------------
// Cancellation bookkeeping.

PrefetchController::CancelAction PrefetchController::MarkCancelledLocked(Job* job,
                                                                         CancelKind kind) {
  if (job->cancel != CancelKind::kNone) return CancelAction::kNothing;
  job->cancel = kind;
  auto it = jobs_.find(job->handle);
  if (it != jobs_.end() && it->second.get() == job) {
    jobs_.erase(it);
    auto c = jobs_per_client_.find(job->client);
    if (c != jobs_per_client_.end() && --c->second == 0) jobs_per_client_.erase(c);
  }
  auto s = sync_by_request_.find(job->req.owner.request);
  if (s != sync_by_request_.end() && s->second == job->handle) sync_by_request_.erase(s);
  counters_.cancelled++;
  cv_.notify_all();
  if (job->queued) {
    queue_.erase(std::remove_if(queue_.begin(), queue_.end(),
                                [job](const std::shared_ptr<Job>& q) { return q.get() == job; }),
                 queue_.end());
    job->queued = false;
    // Holds only its L1 prefix leases.
    return kind == CancelKind::kCancelled ? CancelAction::kReleaseLeases : CancelAction::kNothing;
  }
  if (job->active && job->sync && job->lookup_finished && !job->load_requested && !job->done) {
    // A sync lookup whose load was never started: no callback will come, so the caller drops
    // its pins and completes it (which releases per `kind`).
    return CancelAction::kAbandonIdle;
  }
  if (!job->active && !job->publishing) {
    // Finished: holds exactly result.hits leases.
    return kind == CancelKind::kCancelled ? CancelAction::kReleaseLeases : CancelAction::kNothing;
  }
  // In flight: the pipeline sees `cancel` when its current step ends and cleans up what it
  // published; the L1 prefix goes back now.
  if (kind != CancelKind::kCancelled) return CancelAction::kNothing;
  job->prefix_released = true;
  return CancelAction::kReleasePrefix;
}

void PrefetchController::RunCancelAction(const std::shared_ptr<Job>& job, CancelAction action) {
  switch (action) {
    case CancelAction::kNothing: break;
    case CancelAction::kReleaseLeases: ReleaseJobLeases(*job); break;
    case CancelAction::kReleasePrefix:
      ReleaseLeases(table_, job->req.owner.request, job->LeasedPrefix(0, job->l1_hits), job->count);
      break;
    case CancelAction::kAbandonIdle:
      UnpinAll(job.get());
      Complete(job, {job->l1_hits, job->l1_hits, 0}, Status::Cancelled("cancelled"));
      break;
  }
  Notice(job->handle, job->req.owner.request);  // a parked waiter answers (NotFound, Cancelled)
}

void PrefetchController::SetCompletionNotice(CompletionNotice notice) {
  std::lock_guard<std::mutex> lock(notice_mu_);
  notice_ = notice ? std::make_shared<const CompletionNotice>(std::move(notice)) : nullptr;
}

void PrefetchController::Notice(const JobHandle& handle, RequestId request) {
  std::shared_ptr<const CompletionNotice> notice;
  {
    std::lock_guard<std::mutex> lock(notice_mu_);
    notice = notice_;
  }
  if (notice) (*notice)(handle, request);
}

bool PrefetchController::LoadPending(RequestId request) {
  std::shared_ptr<Job> job;
  bool start = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto s = sync_by_request_.find(request);
    if (s == sync_by_request_.end()) return false;
    job = jobs_.at(s->second);
    if (job->done || job->cancel != CancelKind::kNone || stopped_) return false;
    if (!job->load_requested) {
      // As WaitLoad: the first joiner starts a load the lookup did not start.
      job->load_requested = true;
      start = job->lookup_finished && job->planned > 0;
    }
  }
  if (start) StartLoadPhase(job);
  return true;
}

void PrefetchController::ReleaseJobLeases(const Job& job) {
  // The job holds `count` leases on keys[0, hits) where hits is its result (if finished) or its
  // L1 prefix (if it never got further).
  size_t hits;
  {
    std::lock_guard<std::mutex> lock(mu_);
    hits = job.done ? job.result.hits : job.l1_hits;
  }
  ReleaseLeases(table_, job.req.owner.request, job.LeasedPrefix(0, hits), job.count);
}

Result<std::shared_ptr<PrefetchController::Job>> PrefetchController::FindLocked(
    ClientId client, const JobHandle& handle) {
  auto it = jobs_.find(handle);
  if (it == jobs_.end()) {
    return Status::NotFound("no such lookup job (unknown, already collected or cancelled)");
  }
  if (it->second->client != client) {
    return Status::PermissionDenied("the lookup job belongs to another client");
  }
  return it->second;
}

// ------------------------------------------------------------------------------------------
// Entry points.

namespace {

Status ValidateRequest(const PrefetchRequest& r, bool have_adapters) {
  if (r.owner.request & kInternalRequestBit) {
    return Status::InvalidArgument("request ids with the top bit set are reserved");
  }
  if (have_adapters && r.object_size == 0 && !r.keys.empty()) {
    return Status::InvalidArgument("object_size must be > 0 when L2 adapters are configured");
  }
  return Status::Ok();
}

}  // namespace

Result<JobHandle> PrefetchController::Submit(PrefetchRequest request) {
  LMCACHE_RETURN_IF_ERROR(ValidateRequest(request, !adapters_.empty()));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return Status::Unavailable("prefetch controller is stopped");
    auto c = jobs_per_client_.find(request.owner.client);
    if (c != jobs_per_client_.end() && c->second >= options_.max_jobs_per_client) {
      return Status::ResourceExhausted("client has too many lookup jobs outstanding");
    }
  }
  auto job = std::make_shared<Job>();
  job->client = request.owner.client;
  job->count = 1 + request.extra_count;
  job->req = std::move(request);
  job->created = clock_->Now();
  // Step 1, on the caller's thread: lease the L1 prefix (fast, no I/O).
  const size_t l1 = table_->AcquireReadPrefix(job->req.owner, job->req.keys, job->count);
  const size_t n = job->req.keys.size();
  bool start = false;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (stopped_) {
      lock.unlock();
      ReleaseLeases(table_, job->req.owner.request, job->LeasedPrefix(0, l1), job->count);
      return Status::Unavailable("prefetch controller is stopped");
    }
    do {
      job->handle = JobHandle::Random();
    } while (jobs_.count(job->handle) != 0);
    jobs_.emplace(job->handle, job);
    jobs_per_client_[job->client]++;
    counters_.submitted++;
    counters_.l1_hit_keys += l1;
    job->l1_hits = l1;
    if (l1 == n || adapters_.empty()) {
      job->done = true;
      job->result = {l1, l1, 0};
      counters_.completed++;
    } else if (in_flight_ < options_.max_in_flight) {
      job->holds_slot = true;
      ++in_flight_;
      job->active = true;
      ++active_;
      start = true;
    } else {
      job->queued = true;
      queue_.push_back(job);
    }
  }
  if (start) StartL2Lookup(job);
  cv_.notify_all();
  return job->handle;
}

Result<std::optional<PrefetchResult>> PrefetchController::Query(ClientId client,
                                                                const JobHandle& handle) {
  return Wait(client, handle, Duration::zero());
}

Result<std::optional<PrefetchResult>> PrefetchController::Wait(ClientId client,
                                                               const JobHandle& handle,
                                                               Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  LMCACHE_ASSIGN_OR_RETURN(std::shared_ptr<Job> job, FindLocked(client, handle));
  if (job->sync) {
    return Status::InvalidArgument("handle of a synchronous lookup; join it with WaitLoad");
  }
  if (timeout > Duration::zero()) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    cv_.wait_until(lock, deadline,
                   [&] { return job->done || job->cancel != CancelKind::kNone || stopped_; });
  }
  if (job->cancel != CancelKind::kNone) return Status::NotFound("the lookup job was cancelled");
  if (!job->done) return std::optional<PrefetchResult>();
  // Delivered exactly once: the handle is gone now.
  jobs_.erase(job->handle);
  auto c = jobs_per_client_.find(job->client);
  if (c != jobs_per_client_.end() && --c->second == 0) jobs_per_client_.erase(c);
  return std::optional<PrefetchResult>(job->result);
}

Status PrefetchController::Cancel(ClientId client, const JobHandle& handle) {
  std::shared_ptr<Job> job;
  CancelAction action;
  {
    std::lock_guard<std::mutex> lock(mu_);
    LMCACHE_ASSIGN_OR_RETURN(job, FindLocked(client, handle));
    action = MarkCancelledLocked(job.get(), CancelKind::kCancelled);
  }
  RunCancelAction(job, action);
  return Status::Ok();
}

Result<std::optional<SyncLookupResult>> PrefetchController::LookupAndPinInL1(
    PrefetchRequest request) {
  return SyncLookupImpl(std::move(request), Duration::zero(), /*start_load=*/false,
                        SyncLookupScope::kL1Only);
}

Result<SyncLookupResult> PrefetchController::LookupAndPin(PrefetchRequest request, Duration timeout,
                                                          bool start_load) {
  LMCACHE_ASSIGN_OR_RETURN(
      std::optional<SyncLookupResult> out,
      SyncLookupImpl(std::move(request), timeout, start_load, SyncLookupScope::kL1AndL2));
  return *std::move(out);
}

Result<std::optional<SyncLookupResult>> PrefetchController::SyncLookupImpl(PrefetchRequest request,
                                                                           Duration timeout,
                                                                           bool start_load,
                                                                           SyncLookupScope scope) {
  const bool l1_only = scope == SyncLookupScope::kL1Only;
  LMCACHE_RETURN_IF_ERROR(ValidateRequest(request, !adapters_.empty()));
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto job = std::make_shared<Job>();
  job->client = request.owner.client;
  job->count = 1 + request.extra_count;
  job->req = std::move(request);
  job->sync = true;
  job->created = clock_->Now();
  const size_t n = job->req.keys.size();
  // A request has one sync lookup: the previous one (an engine looking the request up again, as
  // after a preemption) returns what it still holds *before* this one leases, so that what it
  // returns cannot be this lookup's leases.
  std::shared_ptr<Job> previous;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return Status::Unavailable("prefetch controller is stopped");
    auto prev = sync_by_request_.find(job->req.owner.request);
    if (prev != sync_by_request_.end()) {
      auto pj = jobs_.find(prev->second);
      if (pj != jobs_.end()) previous = pj->second;
    }
  }
  if (previous) {
    // The socket-thread variant changes nothing when it would have to ask L2.
    if (l1_only && !adapters_.empty() && !table_->Contains(job->req.keys).All()) {
      return std::optional<SyncLookupResult>();
    }
    CancelAction action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      action = MarkCancelledLocked(previous.get(), CancelKind::kCancelled);
    }
    RunCancelAction(previous, action);
  }
  const size_t l1 = table_->AcquireReadPrefix(job->req.owner, job->req.keys, job->count);
  if (l1_only && l1 < n && !adapters_.empty()) {
    ReleaseLeases(table_, job->req.owner.request, job->LeasedPrefix(0, l1), job->count);
    return std::optional<SyncLookupResult>();
  }
  std::shared_ptr<Job> superseded;
  CancelAction superseded_action = CancelAction::kNothing;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (stopped_) {
      lock.unlock();
      ReleaseLeases(table_, job->req.owner.request, job->LeasedPrefix(0, l1), job->count);
      return Status::Unavailable("prefetch controller is stopped");
    }
    // A concurrent sync lookup of the same request registered meanwhile: the later one wins.
    auto prev = sync_by_request_.find(job->req.owner.request);
    if (prev != sync_by_request_.end()) {
      auto pj = jobs_.find(prev->second);
      if (pj != jobs_.end()) {
        superseded = pj->second;
        superseded_action = MarkCancelledLocked(superseded.get(), CancelKind::kCancelled);
      }
    }
    do {
      job->handle = JobHandle::Random();
    } while (jobs_.count(job->handle) != 0);
    jobs_.emplace(job->handle, job);
    jobs_per_client_[job->client]++;
    sync_by_request_[job->req.owner.request] = job->handle;
    counters_.submitted++;
    counters_.l1_hit_keys += l1;
    job->l1_hits = l1;
    if (l1 == n || adapters_.empty()) {
      job->done = true;
      job->lookup_finished = true;
      job->result = {l1, l1, 0};
      counters_.completed++;
    } else {
      job->active = true;
      ++active_;
    }
  }
  if (superseded) RunCancelAction(superseded, superseded_action);
  SyncLookupResult out;
  out.handle = job->handle;
  out.l1_hits = l1;
  out.hits = l1;
  if (job->done) return std::optional<SyncLookupResult>(out);

  StartL2Lookup(job);
  bool start = false;
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_until(lock, deadline, [&] {
      return job->lookup_finished || job->cancel != CancelKind::kNone || stopped_;
    });
    if (job->cancel != CancelKind::kNone) return Status::Cancelled("sync lookup was cancelled");
    if (job->lookup_finished) {
      out.l2_planned = job->planned;
      out.hits = l1 + job->planned;
      if (job->planned > 0 && start_load && !job->load_requested) {
        job->load_requested = true;
        start = true;
      }
    } else {
      // The adapters did not answer in time: answer with L1 only; late pins are dropped as the
      // callbacks arrive, and a retrieve that joins finds exactly the L1 prefix.
      job->lookup_timed_out = true;
      job->done = true;
      job->result = {l1, l1, 0};
      counters_.l2_lookup_timeouts++;
      counters_.completed++;
      out.l2_timed_out = true;
    }
  }
  if (start) StartLoadPhase(job);
  cv_.notify_all();
  return std::optional<SyncLookupResult>(out);
}

Status PrefetchController::StartLoad(ClientId client, const JobHandle& handle) {
  std::shared_ptr<Job> job;
  {
    std::lock_guard<std::mutex> lock(mu_);
    LMCACHE_ASSIGN_OR_RETURN(job, FindLocked(client, handle));
    if (!job->sync) return Status::InvalidArgument("not a synchronous lookup");
    if (job->done || !job->lookup_finished || job->load_requested || job->planned == 0) {
      return Status::Ok();
    }
    job->load_requested = true;
  }
  StartLoadPhase(job);
  return Status::Ok();
}

Result<PrefetchResult> PrefetchController::WaitLoad(RequestId request, Duration timeout) {
  std::shared_ptr<Job> job;
  bool start = false;
  std::unique_lock<std::mutex> lock(mu_);
  auto s = sync_by_request_.find(request);
  if (s == sync_by_request_.end()) {
    return Status::NotFound("no synchronous lookup pending for the request");
  }
  job = jobs_.at(s->second);
  if (!job->done && !job->load_requested && job->cancel == CancelKind::kNone) {
    // Not started by the lookup: the first joiner starts it (or, if the L2 lookup is still
    // running, asks for it to start as soon as the plan is known).
    job->load_requested = true;
    start = job->lookup_finished && job->planned > 0;
  }
  if (start) {
    lock.unlock();
    StartLoadPhase(job);
    lock.lock();
  }
  const bool finished = cv_.wait_for(
      lock, timeout, [&] { return job->done || job->cancel != CancelKind::kNone || stopped_; });
  if (job->cancel != CancelKind::kNone || (stopped_ && !job->done)) {
    return Status::Cancelled("the synchronous lookup was cancelled");
  }
  if (!finished) return Status::Timeout("the L2 load of the request did not finish in time");
  return job->result;
}

// ------------------------------------------------------------------------------------------
// Cleanup.

size_t PrefetchController::EndMatching(const std::function<bool(const Job&)>& match) {
  std::vector<std::pair<std::shared_ptr<Job>, CancelAction>> actions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::shared_ptr<Job>> victims;
    for (auto& [h, job] : jobs_) {
      if (match(*job)) victims.push_back(job);
    }
    // kEnded: the caller drops the request's ledger; only pins and temporaries are ours to drop.
    for (auto& job : victims) {
      actions.emplace_back(job, MarkCancelledLocked(job.get(), CancelKind::kEnded));
    }
  }
  for (auto& [job, action] : actions) RunCancelAction(job, action);
  return actions.size();
}

size_t PrefetchController::EndRequest(RequestId request) {
  return EndMatching([request](const Job& j) { return j.req.owner.request == request; });
}

size_t PrefetchController::EndClient(ClientId client) {
  return EndMatching([client](const Job& j) { return j.client == client; });
}

size_t PrefetchController::ReapExpired() {
  std::vector<std::pair<std::shared_ptr<Job>, CancelAction>> actions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const TimePoint now = clock_->Now();
    std::vector<std::shared_ptr<Job>> expired;
    for (auto& [h, job] : jobs_) {
      if (job->created + options_.job_ttl <= now) expired.push_back(job);
    }
    for (auto& job : expired) {
      actions.emplace_back(job, MarkCancelledLocked(job.get(), CancelKind::kCancelled));
      counters_.reaped++;
    }
  }
  for (auto& [job, action] : actions) RunCancelAction(job, action);
  return actions.size();
}

void PrefetchController::ReapLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!reaper_stop_) {
    reaper_cv_.wait_for(lock, options_.reap_interval, [this] { return reaper_stop_; });
    if (reaper_stop_) break;
    lock.unlock();
    ReapExpired();
    lock.lock();
  }
}

std::unordered_map<ClientId, size_t> PrefetchController::JobsByClient() const {
  std::lock_guard<std::mutex> lock(mu_);
  return jobs_per_client_;
}

PrefetchStats PrefetchController::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  PrefetchStats s = counters_;
  s.jobs = jobs_.size();
  s.in_flight = in_flight_;
  s.queued = queue_.size();
  return s;
}

// ------------------------------------------------------------------------------------------
// The pipeline (runs on the submitting thread for step 2's submission, then on adapter threads).

void PrefetchController::StartL2Lookup(const std::shared_ptr<Job>& job) {
  std::vector<ObjectKey> rest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t m = job->req.keys.size() - job->l1_hits;
    job->pinned.assign(adapters_.size(), Bitmap(m));
    job->pending = adapters_.size();
    rest = job->Rest(0, m);
  }
  for (size_t a = 0; a < adapters_.size(); ++a) {
    adapters_[a]->SubmitLookupAndPin(rest, [this, job, a](const Status& st, const Bitmap& pinned) {
      OnLookupDone(job, a, st, pinned);
    });
  }
}

void PrefetchController::OnLookupDone(const std::shared_ptr<Job>& job, size_t adapter,
                                      const Status& status, const Bitmap& pinned) {
  bool drop_all = false;  // the job will not load: drop every pin
  bool load_now = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (status.ok() && pinned.size() == job->pinned[adapter].size()) {
      job->pinned[adapter] = pinned;
    } else {
      if (!status.ok() && status.code() != StatusCode::kCancelled) {
        Log(LogLevel::kWarning,
            "L2 lookup failed on adapter " + adapters_[adapter]->name() + ": " + status.ToString());
      }
      job->pinned[adapter] = Bitmap(job->pinned[adapter].size());  // nothing pinned
    }
    if (--job->pending > 0) return;
    // All adapters answered: plan the contiguous prefix, first adapter wins.
    const size_t m = job->pinned.empty() ? 0 : job->pinned[0].size();
    job->source.clear();
    size_t p = 0;
    for (; p < m; ++p) {
      int src = -1;
      for (size_t a = 0; a < adapters_.size(); ++a) {
        if (job->pinned[a].Test(p)) {
          src = static_cast<int>(a);
          break;
        }
      }
      if (src < 0) break;
      job->source.push_back(src);
    }
    job->planned = p;
    job->lookup_finished = true;
    if (job->cancel != CancelKind::kNone || job->lookup_timed_out || p == 0) {
      drop_all = true;
    } else if (!job->sync || job->load_requested) {
      // Two-phase lookups load at once; a sync lookup loads at once if a joiner asked already.
      job->load_requested = true;
      load_now = true;
    }
    // Otherwise (sync with a plan) the LookupAndPin waiter or a WaitLoad joiner starts the load.
  }
  cv_.notify_all();
  if (load_now) {
    StartLoadPhase(job);
    return;
  }
  if (drop_all) {
    UnpinAll(job.get());
    Complete(job, {job->l1_hits, job->l1_hits, 0}, Status::Ok());
  }
}

void PrefetchController::UnpinAll(Job* job) {
  std::vector<std::vector<ObjectKey>> per_adapter(adapters_.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t a = 0; a < job->pinned.size(); ++a) {
      Bitmap& bm = job->pinned[a];
      for (size_t i = bm.FindNextSet(0); i < bm.size(); i = bm.FindNextSet(i + 1)) {
        per_adapter[a].push_back(job->req.keys[job->l1_hits + i]);
      }
      bm.ResetAll();
    }
  }
  for (size_t a = 0; a < per_adapter.size(); ++a) {
    if (!per_adapter[a].empty()) adapters_[a]->Unpin(per_adapter[a]);
  }
}

void PrefetchController::StartLoadPhase(const std::shared_ptr<Job>& job) {
  std::vector<ObjectKey> plan;
  std::vector<int> source;
  RequestId internal = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (job->cancel != CancelKind::kNone) {
      // Cancelled between lookup and load.
      plan.clear();
    } else {
      plan = job->Rest(0, job->planned);
      source = job->source;
      internal = next_internal_request_++;
      job->internal_request = internal;
    }
  }
  if (plan.empty()) {
    UnpinAll(job.get());
    Complete(job, {job->l1_hits, job->l1_hits, 0}, Status::Cancelled("cancelled"));
    return;
  }
  const PrefetchRequest& req = job->req;
  // Step 4: temporary L1 objects for the plan, reserved under the internal request id.
  auto reserved = table_->ReserveWrite({req.owner.client, internal}, plan, req.object_size,
                                       {ReserveMode::kNewOnly, /*temporary=*/true});
  std::vector<KeyState> state;
  std::vector<ObjectKey> aborted;
  size_t p = 0;
  if (reserved.ok()) {
    for (; p < plan.size(); ++p) {
      if (!(*reserved)[p].skipped) {
        state.push_back(KeyState::kLoad);
        continue;
      }
      // Another request put this key in L1 meanwhile: lease it directly, or stop the plan here.
      if (table_->AcquireRead(req.owner, {plan[p]}, job->count).ok()) {
        state.push_back(KeyState::kLeased);
        continue;
      }
      break;
    }
    for (size_t i = p; i < plan.size(); ++i) {
      if (!(*reserved)[i].skipped) aborted.push_back(plan[i]);
    }
  } else {
    Log(LogLevel::kWarning, "prefetch: cannot reserve L1 space for " + std::to_string(plan.size()) +
                                " objects loaded from L2: " + reserved.status().ToString());
  }
  AbortWrites(table_, internal, aborted);

  // Step 5: drop the pins the plan does not use; group the loads by adapter.
  std::vector<std::vector<ObjectKey>> unpin(adapters_.size());
  std::vector<std::vector<size_t>> groups(adapters_.size());
  std::vector<std::vector<MutableBuffer>> buffers(adapters_.size());
  std::vector<std::vector<ObjectKey>> group_keys(adapters_.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    job->state = state;
    job->planned = p;
    for (size_t a = 0; a < adapters_.size(); ++a) {
      Bitmap& bm = job->pinned[a];
      for (size_t i = bm.FindNextSet(0); i < bm.size(); i = bm.FindNextSet(i + 1)) {
        const bool keep = i < p && state[i] == KeyState::kLoad && source[i] == static_cast<int>(a);
        if (keep) {
          groups[a].push_back(i);
          group_keys[a].push_back(plan[i]);
          buffers[a].push_back({table_->data((*reserved)[i].offset), req.object_size});
        } else {
          unpin[a].push_back(job->req.keys[job->l1_hits + i]);
          bm.Reset(i);
        }
      }
    }
    job->groups = groups;
    job->loaded.assign(adapters_.size(), Bitmap());
    job->pending = 0;
    for (const auto& g : groups) job->pending += g.empty() ? 0 : 1;
  }
  for (size_t a = 0; a < adapters_.size(); ++a) {
    if (!unpin[a].empty()) adapters_[a]->Unpin(unpin[a]);
  }
  bool any = false;
  for (size_t a = 0; a < adapters_.size(); ++a) {
    if (groups[a].empty()) continue;
    any = true;
    adapters_[a]->SubmitLoad(
        std::move(group_keys[a]), std::move(buffers[a]),
        [this, job, a](const Status& st, const Bitmap& loaded) { OnLoadDone(job, a, st, loaded); });
  }
  if (!any) FinishLoad(job);
}

void PrefetchController::OnLoadDone(const std::shared_ptr<Job>& job, size_t group,
                                    const Status& status, const Bitmap& loaded) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (status.ok() && loaded.size() == job->groups[group].size()) {
      job->loaded[group] = loaded;
    } else {
      if (!status.ok() && status.code() != StatusCode::kCancelled) {
        Log(LogLevel::kWarning,
            "L2 load failed on adapter " + adapters_[group]->name() + ": " + status.ToString());
      }
      job->loaded[group] = Bitmap(job->groups[group].size());
    }
    if (--job->pending > 0) return;
  }
  FinishLoad(job);
}

void PrefetchController::FinishLoad(const std::shared_ptr<Job>& job) {
  const PrefetchRequest& req = job->req;
  std::vector<ObjectKey> publish, abort, release_leased;
  std::vector<std::vector<ObjectKey>> unpin(adapters_.size());
  size_t q = 0;
  RequestId internal;
  bool publishing = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    internal = job->internal_request;
    const size_t p = job->planned;
    std::vector<uint8_t> ok(p, 0);
    for (size_t i = 0; i < p; ++i) ok[i] = job->state[i] == KeyState::kLeased;
    for (size_t a = 0; a < job->groups.size(); ++a) {
      for (size_t j = 0; j < job->groups[a].size(); ++j) {
        const size_t i = job->groups[a][j];
        if (job->loaded[a].size() > j && job->loaded[a].Test(j)) ok[i] = 1;
        unpin[a].push_back(job->req.keys[job->l1_hits + i]);
      }
      job->pinned[a].ResetAll();
    }
    while (q < p && ok[q]) ++q;
    const bool cancelled = job->cancel != CancelKind::kNone;
    if (cancelled) q = 0;
    for (size_t i = 0; i < p; ++i) {
      const ObjectKey& key = job->req.keys[job->l1_hits + i];
      if (job->state[i] == KeyState::kLoad) {
        (i < q ? publish : abort).push_back(key);
      } else if (i >= q) {
        release_leased.push_back(key);
      }
    }
    counters_.l2_hit_keys += q;
    counters_.load_failures += p - q;
    publishing = !publish.empty();
    job->publishing = publishing;
  }
  // Step 6: publish the loaded prefix to the request; discard the rest.
  if (publishing) {
    Status st = table_->FinishWriteFor(internal, publish, req.owner, job->count);
    if (!st.ok()) {
      Log(LogLevel::kWarning, "prefetch: publishing loaded objects failed: " + st.ToString());
      AbortWrites(table_, internal, publish);
      // Nothing from L2 is usable: the leased-directly keys inside the prefix go back too.
      for (size_t i = 0; i < q; ++i) {
        if (job->state[i] == KeyState::kLeased) {
          release_leased.push_back(job->req.keys[job->l1_hits + i]);
        }
      }
      q = 0;
    }
  }
  AbortWrites(table_, internal, abort);
  // Writes whose lease was dropped meanwhile (reaped, or the client ended) were quarantined: the
  // adapters are done writing into them now.
  (void)table_->ReleaseQuarantine(internal);
  ReleaseLeases(table_, req.owner.request, release_leased, job->count);
  // Step 7: drop the remaining pins.
  for (size_t a = 0; a < adapters_.size(); ++a) {
    if (!unpin[a].empty()) adapters_[a]->Unpin(unpin[a]);
  }
  Complete(job, {job->l1_hits + q, job->l1_hits, q}, Status::Ok());
}

void PrefetchController::Complete(const std::shared_ptr<Job>& job, PrefetchResult result,
                                  Status status) {
  // The job stays active (WaitIdle does not return) until every release it owes has been made.
  // A cancel can arrive at any point; it changes job->cancel once, from kNone. Each pass
  // releases for the cancel kind seen, and the job retires when no new kind appeared.
  std::vector<std::shared_ptr<Job>> start;
  CancelKind handled = CancelKind::kNone;
  bool first = true;
  while (true) {
    size_t from = 0, to = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (first) {
        job->publishing = false;
        if (job->cancel == CancelKind::kNone && !job->done) {
          job->done = true;
          job->result = result;
          job->status = std::move(status);
          counters_.completed++;
        }
        first = false;
      }
      const CancelKind kind = job->cancel;
      if (kind == handled) {
        if (job->active) {
          job->active = false;
          --active_;
        }
        if (job->holds_slot) {
          job->holds_slot = false;
          --in_flight_;
          while (in_flight_ < options_.max_in_flight && !queue_.empty()) {
            std::shared_ptr<Job> next = queue_.front();
            queue_.pop_front();
            next->queued = false;
            next->holds_slot = true;
            ++in_flight_;
            next->active = true;
            ++active_;
            start.push_back(std::move(next));
          }
        }
        break;
      }
      // kCancelled: the job's L1 prefix and whatever it published. kEnded: only what it
      // published (the request's ledger is dropped by the caller anyway).
      from = kind == CancelKind::kCancelled && !job->prefix_released ? 0 : job->l1_hits;
      to = result.hits;
      handled = kind;
    }
    if (to > from) {
      ReleaseLeases(table_, job->req.owner.request, job->LeasedPrefix(from, to), job->count);
    }
  }
  cv_.notify_all();
  Notice(job->handle, job->req.owner.request);
  for (auto& next : start) StartL2Lookup(next);
}

}  // namespace lmcache_cpp
