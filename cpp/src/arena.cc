// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

namespace lmcache_cpp {}  // namespace lmcache_cpp
