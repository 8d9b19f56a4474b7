// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// A minimal logging hook. The core logs rarely (warnings such as "huge pages unavailable" and
// background-thread errors); never per key on a hot path. By default messages go to stderr at
// kWarning and above; the Python module installs a sink that forwards to the `logging` package.
//
// Thread safety: Log() may be called from any thread. SetLogSink must not race with Log(): an
// embedding host installs its sink once, before it creates a StorageManager. The sink runs on the
// core's threads (adapter workers, controllers), so it must be thread-safe and must not call back
// into the engine.
//
// Stability: stable.
#ifndef LMCACHE_CPP_LOGGING_H_
#define LMCACHE_CPP_LOGGING_H_

#include <functional>
#include <string>

namespace lmcache_cpp {

enum class LogLevel : int { kDebug = 10, kInfo = 20, kWarning = 30, kError = 40 };

using LogSink = std::function<void(LogLevel, const std::string&)>;

// Replaces the sink; an empty function restores the stderr sink. Messages below `min_level` are
// dropped before formatting reaches the sink.
void SetLogSink(LogSink sink, LogLevel min_level = LogLevel::kWarning);
bool LogEnabled(LogLevel level);
void Log(LogLevel level, const std::string& message);

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_LOGGING_H_
