// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "redis/url.h"

#include <utility>

namespace lmcache_cpp {
namespace redis {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool PercentDecode(std::string_view in, std::string* out) {
  out->clear();
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out->push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size()) return false;
    const int hi = HexValue(in[i + 1]), lo = HexValue(in[i + 2]);
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return true;
}

bool ParseDecimal(std::string_view s, uint64_t max, uint64_t* out) {
  if (s.empty() || s.size() > 10) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v > max) return false;
  *out = v;
  return true;
}

Status Bad(std::string_view what) {
  return Status::InvalidArgument("redis url: " + std::string(what));
}

}  // namespace

std::string Endpoint::ToString() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

Result<Endpoint> ParseHostPort(std::string_view text) {
  Endpoint ep;
  std::string_view port;
  if (!text.empty() && text[0] == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos)
      return Bad("unclosed '[' in host '" + std::string(text) + "'");
    ep.host.assign(text.substr(1, close - 1));
    const std::string_view rest = text.substr(close + 1);
    if (!rest.empty()) {
      if (rest[0] != ':') return Bad("expected ':' after ']' in '" + std::string(text) + "'");
      port = rest.substr(1);
      if (port.empty()) return Bad("empty port in '" + std::string(text) + "'");
    }
    if (ep.host.empty() || ep.host.find(':') == std::string::npos) {
      return Bad("'[...]' must hold an IPv6 address in '" + std::string(text) + "'");
    }
  } else {
    const size_t colon = text.rfind(':');
    if (colon != std::string_view::npos) {
      if (text.find(':') != colon) {
        return Bad("an IPv6 address must be bracketed, as in [::1]:6379, not '" +
                   std::string(text) + "'");
      }
      port = text.substr(colon + 1);
      if (port.empty()) return Bad("empty port in '" + std::string(text) + "'");
      text = text.substr(0, colon);
    }
    ep.host.assign(text);
  }
  if (ep.host.empty()) return Bad("no host");
  for (char c : ep.host) {
    if (c <= ' ' || c == '/' || c == '@' || c == '?' || c == '#' || c == '[' || c == ']') {
      return Bad("invalid character in host '" + ep.host + "'");
    }
  }
  if (!port.empty()) {
    uint64_t p = 0;
    if (!ParseDecimal(port, 65535, &p) || p == 0) {
      return Bad("port '" + std::string(port) + "' is not a number in 1..65535");
    }
    ep.port = static_cast<uint16_t>(p);
  }
  return ep;
}

Result<RedisUrl> ParseRedisUrl(std::string_view url) {
  RedisUrl out;
  std::string_view rest;
  if (url.substr(0, 8) == "redis://") {
    rest = url.substr(8);
  } else if (url.substr(0, 9) == "rediss://") {
    out.tls = true;
    rest = url.substr(9);
  } else {
    return Bad("must start with redis:// or rediss://");
  }
  if (rest.find_first_of("?#") != std::string_view::npos) {
    return Bad("query strings and fragments are not supported");
  }
  // The authority ends at the first '/' after the userinfo ('@' may not appear unencoded in a
  // password, '/' may: split on the last '@' first).
  std::string_view userinfo;
  const size_t at = rest.rfind('@');
  if (at != std::string_view::npos) {
    userinfo = rest.substr(0, at);
    rest = rest.substr(at + 1);
  }
  std::string_view path;
  const size_t slash = rest.find('/');
  if (slash != std::string_view::npos) {
    path = rest.substr(slash + 1);
    rest = rest.substr(0, slash);
  }
  Result<Endpoint> ep = ParseHostPort(rest);
  if (!ep.ok()) return ep.status();
  out.endpoint = std::move(*ep);
  if (at != std::string_view::npos) {
    const size_t colon = userinfo.find(':');
    const std::string_view user = userinfo.substr(0, colon);
    if (!PercentDecode(user, &out.username)) return Bad("bad percent-encoding in the user name");
    if (colon == std::string_view::npos) {
      // "redis://secret@host": a lone userinfo is a password, as redis-cli reads it.
      out.password = std::move(out.username);
      out.username.clear();
    } else if (!PercentDecode(userinfo.substr(colon + 1), &out.password)) {
      return Bad("bad percent-encoding in the password");
    }
    if (!out.username.empty() && out.password.empty()) {
      return Bad("a user name needs a password");
    }
  }
  if (!path.empty()) {
    uint64_t db = 0;
    if (!ParseDecimal(path, 1 << 20, &db)) {
      return Bad("the path must be a database number, not '/" + std::string(path) + "'");
    }
    out.db = static_cast<int>(db);
  }
  return out;
}

}  // namespace redis
}  // namespace lmcache_cpp
