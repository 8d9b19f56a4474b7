// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// What the C++ micro-benchmarks share: wall-clock timing, GB/s, failing on a non-OK Status and
// reading the optional numeric arguments of their command lines. Header-only; each benchmark is
// one program.
#ifndef LMCACHE_CPP_BENCHMARKS_BENCH_UTIL_H_
#define LMCACHE_CPP_BENCHMARKS_BENCH_UTIL_H_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "lmcache_cpp/status.h"

namespace lmcache_cpp::bench {

// Seconds from `start` to now (steady clock).
inline double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The fastest of `repeats` runs of `fn`, in seconds.
template <typename Fn>
double BestSeconds(int repeats, const Fn& fn) {
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, SecondsSince(start));
  }
  return best;
}

inline double GBps(uint64_t bytes, double seconds) {
  return static_cast<double>(bytes) / seconds / 1e9;
}

// Prints "<what>: <status>" on stderr and exits with status 1.
[[noreturn]] inline void Fail(const std::string& what, const Status& st) {
  std::fprintf(stderr, "%s: %s\n", what.c_str(), st.ToString().c_str());
  std::exit(1);
}

// Command-line argument `i` as a number (base 10), or `fallback` when there are fewer arguments.
template <typename T>
T ArgOr(int argc, char** argv, int i, T fallback) {
  static_assert(std::is_integral_v<T>);
  if (argc <= i) return fallback;
  if constexpr (std::is_signed_v<T>) {
    return static_cast<T>(std::atoi(argv[i]));
  } else {
    return static_cast<T>(std::strtoull(argv[i], nullptr, 10));
  }
}

}  // namespace lmcache_cpp::bench

#endif  // LMCACHE_CPP_BENCHMARKS_BENCH_UTIL_H_
