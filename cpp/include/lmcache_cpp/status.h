// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Status and Result<T>: how every fallible call in the core reports failure.
//
// Expected failures are values, never exceptions. A miss is not an error: lookups return counts,
// bitmaps or std::optional. A Status is cheap to copy when OK (no allocation); an error carries a
// code and a message. Exceptions are raised only at the Python edge (bindings/), mapped there in
// one place from StatusCode to Python exception types.
//
// Thread safety: Status and Result are values; distinct objects may be used from distinct threads.
//
// Stability: stable. StatusCode values never change and new codes are only appended, so a host
// should treat an unknown code like kInternal. Messages are for humans and may change.
#ifndef LMCACHE_CPP_STATUS_H_
#define LMCACHE_CPP_STATUS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace lmcache_cpp {

// Codes are stable: they travel on the wire (docs/protocol.md) and are append-only.
enum class StatusCode : int32_t {
  kOk = 0,
  kInvalidArgument = 1,     // the caller passed something malformed
  kKeyAbsent = 2,           // the object is not in the table
  kNotReadable = 3,         // the object exists but cannot be read (still being written)
  kNotWritable = 4,         // the object exists and cannot be reserved for writing
  kWrongState = 5,          // the transition is illegal in the object's current state
  kLocked = 6,              // the object holds leases; the operation needs it unleased
  kOutOfMemory = 7,         // the arena cannot hold the batch, even after eviction
  kLeaseNotHeld = 8,        // the request releases or commits a lease it does not hold
  kNotFound = 9,            // a non-object entity (session, handle, engine) does not exist
  kAlreadyExists = 10,      // creating something that exists
  kResourceExhausted = 11,  // a bounded table (per-client jobs, sessions, leases) is full
  kTimeout = 12,            // a deadline passed
  kCancelled = 13,          // the operation was cancelled or the component stopped
  kIoError = 14,            // an operating-system call failed
  kCorruption = 15,         // stored bytes failed validation
  kPermissionDenied = 16,   // the caller may not use this handle or resource
  kUnavailable = 17,        // the component is stopped or not started
  kNotSupported = 18,       // the build or platform lacks the feature
  kInternal = 19,           // an invariant broke; a bug
};

// Returns the stable, human-readable name of `code`, e.g. "KeyAbsent".
const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() noexcept = default;  // OK
  Status(StatusCode code, std::string message);

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string msg) {
    return {StatusCode::kInvalidArgument, std::move(msg)};
  }
  static Status KeyAbsent(std::string msg) { return {StatusCode::kKeyAbsent, std::move(msg)}; }
  static Status NotReadable(std::string msg) { return {StatusCode::kNotReadable, std::move(msg)}; }
  static Status NotWritable(std::string msg) { return {StatusCode::kNotWritable, std::move(msg)}; }
  static Status WrongState(std::string msg) { return {StatusCode::kWrongState, std::move(msg)}; }
  static Status Locked(std::string msg) { return {StatusCode::kLocked, std::move(msg)}; }
  static Status OutOfMemory(std::string msg) { return {StatusCode::kOutOfMemory, std::move(msg)}; }
  static Status LeaseNotHeld(std::string msg) {
    return {StatusCode::kLeaseNotHeld, std::move(msg)};
  }
  static Status NotFound(std::string msg) { return {StatusCode::kNotFound, std::move(msg)}; }
  static Status AlreadyExists(std::string msg) {
    return {StatusCode::kAlreadyExists, std::move(msg)};
  }
  static Status ResourceExhausted(std::string msg) {
    return {StatusCode::kResourceExhausted, std::move(msg)};
  }
  static Status Timeout(std::string msg) { return {StatusCode::kTimeout, std::move(msg)}; }
  static Status Cancelled(std::string msg) { return {StatusCode::kCancelled, std::move(msg)}; }
  static Status IoError(std::string msg) { return {StatusCode::kIoError, std::move(msg)}; }
  static Status Corruption(std::string msg) { return {StatusCode::kCorruption, std::move(msg)}; }
  static Status PermissionDenied(std::string msg) {
    return {StatusCode::kPermissionDenied, std::move(msg)};
  }
  static Status Unavailable(std::string msg) { return {StatusCode::kUnavailable, std::move(msg)}; }
  static Status NotSupported(std::string msg) {
    return {StatusCode::kNotSupported, std::move(msg)};
  }
  static Status Internal(std::string msg) { return {StatusCode::kInternal, std::move(msg)}; }
  // An IoError whose message ends with strerror(errnum).
  static Status FromErrno(int errnum, std::string_view context);

  bool ok() const noexcept { return state_ == nullptr; }
  StatusCode code() const noexcept { return state_ ? state_->code : StatusCode::kOk; }
  // Empty for OK.
  const std::string& message() const noexcept;
  // "OK" or "<CodeName>: <message>".
  std::string ToString() const;

  bool operator==(const Status& other) const noexcept {
    return code() == other.code() && message() == other.message();
  }
  bool operator!=(const Status& other) const noexcept { return !(*this == other); }

 private:
  struct State {
    StatusCode code;
    std::string message;
  };
  // Null when OK. Shared (immutable) so copies are cheap.
  std::shared_ptr<const State> state_;
};

// Holds either a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  // REQUIRES: !status.ok().
  Result(Status status) : v_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (std::get<Status>(v_).ok()) v_ = Status::Internal("Result constructed from an OK status");
  }

  bool ok() const noexcept { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }

  // REQUIRES: ok().
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

#define LMCACHE_CPP_CONCAT_INNER_(a, b) a##b
#define LMCACHE_CPP_CONCAT_(a, b) LMCACHE_CPP_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (a Status) is not OK.
#define LMCACHE_RETURN_IF_ERROR(expr)       \
  do {                                      \
    ::lmcache_cpp::Status _lmc_st = (expr); \
    if (!_lmc_st.ok()) return _lmc_st;      \
  } while (0)

#define LMCACHE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                   \
  if (!tmp.ok()) return tmp.status();                   \
  lhs = std::move(tmp).value()

// `lhs = value of rexpr` (a Result<T>), or returns its Status from the enclosing function.
#define LMCACHE_ASSIGN_OR_RETURN(lhs, rexpr) \
  LMCACHE_ASSIGN_OR_RETURN_IMPL_(LMCACHE_CPP_CONCAT_(_lmc_res_, __LINE__), lhs, rexpr)

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_STATUS_H_
