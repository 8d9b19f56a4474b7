// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/clock.h"

namespace lmcache_cpp {

std::shared_ptr<Clock> SteadyClock::Default() {
  static const std::shared_ptr<Clock> kClock = std::make_shared<SteadyClock>();
  return kClock;
}

}  // namespace lmcache_cpp
