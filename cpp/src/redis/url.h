// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Redis server addresses: an Endpoint (host and port) and the parser of the URLs users write,
//   redis://[[user]:password@]host[:port][/db]     plain TCP, port 6379 by default
//   rediss://...                                   the same over TLS
// where host is a name, an IPv4 address or a bracketed IPv6 address ("[::1]"), and user and
// password may percent-encode any byte ("%40" for '@'). Query strings, fragments, paths other
// than a database number and Unix sockets are rejected with InvalidArgument naming the problem;
// messages never repeat the password. Internal to the core (not installed).
//
// Thread safety: values and pure functions.
#ifndef LMCACHE_CPP_SRC_REDIS_URL_H_
#define LMCACHE_CPP_SRC_REDIS_URL_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace redis {

struct Endpoint {
  std::string host;  // without brackets
  uint16_t port = 6379;

  // "host:port", or "[v6]:port" for a host containing ':'.
  std::string ToString() const;
  bool operator==(const Endpoint& o) const { return port == o.port && host == o.host; }
  bool operator!=(const Endpoint& o) const { return !(*this == o); }
};

struct RedisUrl {
  bool tls = false;
  Endpoint endpoint;
  std::string username;  // empty: the default user
  std::string password;  // empty: no AUTH
  int db = 0;
};

// Parses a redis:// or rediss:// URL. Returns InvalidArgument on anything else.
Result<RedisUrl> ParseRedisUrl(std::string_view url);

// Parses "host:port" or "[v6]:port" as written in MOVED/ASK replies. Returns InvalidArgument.
Result<Endpoint> ParseHostPort(std::string_view text);

}  // namespace redis
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_REDIS_URL_H_
