// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/logging.h"

#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>

namespace lmcache_cpp {
namespace {

std::mutex g_sink_mu;
std::shared_ptr<LogSink> g_sink;  // GUARDED_BY(g_sink_mu); null = stderr
std::atomic<int> g_min_level{static_cast<int>(LogLevel::kWarning)};

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "DEBUG";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kWarning: return "WARNING";
    case LogLevel::kError: return "ERROR";
  }
  return "?";
}

}  // namespace

void SetLogSink(LogSink sink, LogLevel min_level) {
  std::shared_ptr<LogSink> next = sink ? std::make_shared<LogSink>(std::move(sink)) : nullptr;
  {
    std::lock_guard<std::mutex> lock(g_sink_mu);
    g_sink.swap(next);
  }
  g_min_level.store(static_cast<int>(min_level));
  // `next` (the old sink) is destroyed here, outside the lock.
}

bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= g_min_level.load(); }

void Log(LogLevel level, const std::string& message) {
  if (!LogEnabled(level)) return;
  std::shared_ptr<LogSink> sink;
  {
    std::lock_guard<std::mutex> lock(g_sink_mu);
    sink = g_sink;
  }
  if (sink) {
    (*sink)(level, message);  // called outside the lock
  } else {
    std::fprintf(stderr, "[lmcache_cpp %s] %s\n", LevelName(level), message.c_str());
  }
}

}  // namespace lmcache_cpp
