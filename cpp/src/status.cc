// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/status.h"

#include <cstring>

namespace lmcache_cpp {

const char* StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "InvalidArgument";
    case StatusCode::kKeyAbsent: return "KeyAbsent";
    case StatusCode::kNotReadable: return "NotReadable";
    case StatusCode::kNotWritable: return "NotWritable";
    case StatusCode::kWrongState: return "WrongState";
    case StatusCode::kLocked: return "Locked";
    case StatusCode::kOutOfMemory: return "OutOfMemory";
    case StatusCode::kLeaseNotHeld: return "LeaseNotHeld";
    case StatusCode::kNotFound: return "NotFound";
    case StatusCode::kAlreadyExists: return "AlreadyExists";
    case StatusCode::kResourceExhausted: return "ResourceExhausted";
    case StatusCode::kTimeout: return "Timeout";
    case StatusCode::kCancelled: return "Cancelled";
    case StatusCode::kIoError: return "IoError";
    case StatusCode::kCorruption: return "Corruption";
    case StatusCode::kPermissionDenied: return "PermissionDenied";
    case StatusCode::kUnavailable: return "Unavailable";
    case StatusCode::kNotSupported: return "NotSupported";
    case StatusCode::kInternal: return "Internal";
  }
  return "Unknown";
}

Status::Status(StatusCode code, std::string message) {
  if (code != StatusCode::kOk) {
    state_ = std::make_shared<const State>(State{code, std::move(message)});
  }
}

Status Status::FromErrno(int errnum, std::string_view context) {
  char buf[256];
  // GNU strerror_r may return a static string instead of filling buf.
  const char* msg = strerror_r(errnum, buf, sizeof(buf));
  std::string text(context);
  text += ": ";
  text += msg;
  return Status(StatusCode::kIoError, std::move(text));
}

const std::string& Status::message() const noexcept {
  static const std::string kEmpty;
  return state_ ? state_->message : kEmpty;
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s = StatusCodeName(code());
  if (!message().empty()) {
    s += ": ";
    s += message();
  }
  return s;
}

}  // namespace lmcache_cpp
