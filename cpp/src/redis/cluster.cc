// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "redis/cluster.h"

#include <algorithm>
#include <string>
#include <utility>

namespace lmcache_cpp {
namespace redis {
namespace {

// A string-like reply's text, or empty.
std::string_view Text(const Reply& r) {
  if (r.type == ReplyType::kBulkString || r.type == ReplyType::kSimpleString) return r.str;
  return {};
}

// An integer reply, or a bulk string of digits; -1 otherwise.
int64_t Number(const Reply& r) {
  if (r.type == ReplyType::kInteger) return r.integer;
  const std::string_view s = Text(r);
  if (s.empty() || s.size() > 9) return -1;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return -1;
    v = v * 10 + (c - '0');
  }
  return v;
}

// The value of `name` in a key/value list (a RESP2 flat array or a RESP3 map), or null.
const Reply* Field(const Reply& kv, std::string_view name) {
  if (kv.type != ReplyType::kArray && kv.type != ReplyType::kMap) return nullptr;
  for (size_t i = 0; i + 1 < kv.elements.size(); i += 2) {
    if (Text(kv.elements[i]) == name) return &kv.elements[i + 1];
  }
  return nullptr;
}

bool IsList(const Reply& r) { return r.type == ReplyType::kArray || r.type == ReplyType::kSet; }

Status Malformed(const char* what) {
  return Status::Corruption(std::string("malformed cluster map reply: ") + what);
}

bool ValidSlot(int64_t s) { return s >= 0 && s < kSlotCount; }

}  // namespace

uint16_t Crc16(const void* data, size_t n) {
  static const std::array<uint16_t, 256> table = [] {
    std::array<uint16_t, 256> t{};
    for (int i = 0; i < 256; ++i) {
      uint16_t c = static_cast<uint16_t>(i << 8);
      for (int b = 0; b < 8; ++b) {
        c = static_cast<uint16_t>((c & 0x8000) ? (c << 1) ^ 0x1021 : c << 1);
      }
      t[static_cast<size_t>(i)] = c;
    }
    return t;
  }();
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint16_t crc = 0;
  for (size_t i = 0; i < n; ++i) {
    crc = static_cast<uint16_t>((crc << 8) ^ table[((crc >> 8) ^ p[i]) & 0xFF]);
  }
  return crc;
}

uint16_t KeySlot(std::string_view key) {
  const size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return static_cast<uint16_t>(Crc16(key.data(), key.size()) & (kSlotCount - 1));
}

Result<std::vector<SlotRange>> ParseClusterShards(const Reply& reply, bool tls,
                                                  const Endpoint& asked) {
  if (!IsList(reply)) return Malformed("CLUSTER SHARDS is not an array");
  std::vector<SlotRange> out;
  for (const Reply& shard : reply.elements) {
    const Reply* slots = Field(shard, "slots");
    const Reply* nodes = Field(shard, "nodes");
    if (slots == nullptr || nodes == nullptr || !IsList(*slots) || !IsList(*nodes)) {
      return Malformed("a shard without slots or nodes");
    }
    if (slots->elements.size() % 2 != 0) return Malformed("odd slot list");
    if (slots->elements.empty()) continue;  // a shard that serves nothing
    // The online master; else a master the others believe failed (it may be reachable from
    // here, and a dead one costs a fast-failing connect per backoff period).
    const Reply* master = nullptr;
    for (const Reply& node : nodes->elements) {
      const Reply* role = Field(node, "role");
      const Reply* health = Field(node, "health");
      if (role == nullptr || Text(*role) != "master") continue;
      const bool online = health == nullptr || Text(*health) == "online";
      if (master == nullptr || online) master = &node;
      if (online) break;
    }
    if (master == nullptr) continue;  // no master: its slots stay unserved
    Endpoint ep;
    const Reply* endpoint = Field(*master, "endpoint");
    const Reply* ip = Field(*master, "ip");
    if (endpoint != nullptr && !Text(*endpoint).empty() && Text(*endpoint) != "?") {
      ep.host.assign(Text(*endpoint));
    } else if (ip != nullptr && !Text(*ip).empty()) {
      ep.host.assign(Text(*ip));
    } else {
      ep.host = asked.host;
    }
    const Reply* port = Field(*master, tls ? "tls-port" : "port");
    const int64_t p = port != nullptr ? Number(*port) : -1;
    if (p <= 0 || p > 65535) return Malformed(tls ? "a master without a tls-port" : "bad port");
    ep.port = static_cast<uint16_t>(p);
    for (size_t i = 0; i < slots->elements.size(); i += 2) {
      const int64_t a = Number(slots->elements[i]), b = Number(slots->elements[i + 1]);
      if (!ValidSlot(a) || !ValidSlot(b) || a > b) return Malformed("bad slot range");
      out.push_back({static_cast<uint16_t>(a), static_cast<uint16_t>(b), ep});
    }
  }
  return out;
}

Result<std::vector<SlotRange>> ParseClusterSlots(const Reply& reply, const Endpoint& asked) {
  if (!IsList(reply)) return Malformed("CLUSTER SLOTS is not an array");
  std::vector<SlotRange> out;
  for (const Reply& range : reply.elements) {
    if (range.type != ReplyType::kArray || range.elements.size() < 3) {
      return Malformed("a slot range without a master");
    }
    const int64_t a = Number(range.elements[0]), b = Number(range.elements[1]);
    if (!ValidSlot(a) || !ValidSlot(b) || a > b) return Malformed("bad slot range");
    const Reply& m = range.elements[2];
    if (m.type != ReplyType::kArray || m.elements.size() < 2) return Malformed("bad master");
    Endpoint ep;
    ep.host.assign(Text(m.elements[0]));
    if (ep.host.empty() || ep.host == "?") ep.host = asked.host;
    const int64_t p = Number(m.elements[1]);
    if (p <= 0 || p > 65535) return Malformed("bad port");
    ep.port = static_cast<uint16_t>(p);
    out.push_back({static_cast<uint16_t>(a), static_cast<uint16_t>(b), ep});
  }
  return out;
}

ClusterClient::ClusterClient(std::vector<Endpoint> seeds, ClusterOptions options)
    : seeds_(std::move(seeds)), options_(std::move(options)) {
  options_.connection.db = 0;
  owner_.fill(kNoNode);
}

ClusterClient::~ClusterClient() = default;

size_t ClusterClient::NodeIndex(const Endpoint& endpoint) {
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i]->endpoint() == endpoint) return i;
  }
  nodes_.push_back(std::make_unique<Connection>(endpoint, options_.connection));
  return nodes_.size() - 1;
}

const Endpoint* ClusterClient::Owner(uint16_t slot) const {
  const uint16_t n = owner_[slot & (kSlotCount - 1)];
  return n == kNoNode ? nullptr : &nodes_[n]->endpoint();
}

Status ClusterClient::RefreshSlotMap() {
  ++stats_.refreshes;
  std::vector<Endpoint> candidates;
  for (const auto& n : nodes_) candidates.push_back(n->endpoint());
  for (const Endpoint& s : seeds_) {
    if (std::find(candidates.begin(), candidates.end(), s) == candidates.end()) {
      candidates.push_back(s);
    }
  }
  Status last = Status::Unavailable("redis cluster: no seed node");
  for (const Endpoint& ep : candidates) {
    Connection* conn = nodes_[NodeIndex(ep)].get();
    Result<Reply> r = conn->Command({"CLUSTER", "SHARDS"});
    Result<std::vector<SlotRange>> ranges = Status::Unavailable("unset");
    if (r.ok() && r->is_error() && r->str.find("nknown subcommand") != std::string::npos) {
      r = conn->Command({"CLUSTER", "SLOTS"});  // before Redis 7
      if (r.ok() && !r->is_error()) ranges = ParseClusterSlots(*r, ep);
    } else if (r.ok() && !r->is_error()) {
      ranges = ParseClusterShards(*r, options_.connection.tls, ep);
    }
    if (!r.ok()) {
      last = r.status();
      continue;
    }
    if (r->is_error()) {
      last = Status::Unavailable("redis cluster: " + ep.ToString() + ": " + r->str);
      continue;
    }
    if (!ranges.ok()) {
      last = Status(ranges.status().code(), ep.ToString() + ": " + ranges.status().message());
      continue;
    }
    std::array<uint16_t, kSlotCount> owner;
    owner.fill(kNoNode);
    for (const SlotRange& range : *ranges) {
      const uint16_t idx = static_cast<uint16_t>(NodeIndex(range.master));
      for (uint32_t s = range.first; s <= range.last; ++s) owner[s] = idx;
    }
    owner_ = owner;
    have_map_ = true;
    return Status::Ok();
  }
  ++stats_.refresh_failures;
  return last;
}

void ClusterClient::Execute(const Request* requests, size_t n,
                            std::vector<Result<Reply>>* results) {
  ++stats_.batches;
  results->assign(n, Result<Reply>(Status::Unavailable("redis cluster: not executed")));
  if (n == 0) return;
  if (!have_map_) {
    const Status st = RefreshSlotMap();
    if (!st.ok()) {
      results->assign(n, Result<Reply>(st));
      return;
    }
  }
  struct Pending {
    size_t index;
    uint16_t node;
    bool asking;
  };
  std::vector<Pending> pending;
  pending.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    pending.push_back({i, owner_[KeySlot(requests[i].key())], false});
  }
  bool refresh = false;
  std::vector<Request> batch;
  std::vector<size_t> origin;  // per request of `batch`: index into `group`, or SIZE_MAX (ASKING)
  std::vector<Reply> replies;
  const Request asking = Request::Of({"ASKING"});
  for (int round = 0; !pending.empty() && round <= options_.max_redirects; ++round) {
    std::stable_sort(pending.begin(), pending.end(),
                     [](const Pending& a, const Pending& b) { return a.node < b.node; });
    std::vector<Pending> retry;
    for (size_t g = 0; g < pending.size();) {
      size_t end = g;
      while (end < pending.size() && pending[end].node == pending[g].node) ++end;
      const uint16_t node = pending[g].node;
      if (node == kNoNode) {
        for (size_t k = g; k < end; ++k) {
          const size_t i = pending[k].index;
          (*results)[i] = Status::Unavailable("redis cluster: slot " +
                                              std::to_string(KeySlot(requests[i].key())) +
                                              " has no master in the cluster map");
        }
        refresh = true;
        g = end;
        continue;
      }
      batch.clear();
      origin.clear();
      for (size_t k = g; k < end; ++k) {
        if (pending[k].asking) {
          batch.push_back(asking);
          origin.push_back(SIZE_MAX);
        }
        batch.push_back(requests[pending[k].index]);
        origin.push_back(k);
      }
      Connection* conn = nodes_[node].get();
      ++stats_.node_batches;
      const Status st = conn->Execute(batch, &replies);
      if (!st.ok()) {
        ++stats_.node_failures;
        for (size_t k = g; k < end; ++k) (*results)[pending[k].index] = st;
        refresh = true;
        g = end;
        continue;
      }
      for (size_t j = 0; j < replies.size(); ++j) {
        if (origin[j] == SIZE_MAX) continue;
        const size_t i = pending[origin[j]].index;
        Reply& reply = replies[j];
        const std::string_view code = ErrorCode(reply);
        if (code == "MOVED" || code == "ASK") {
          // "MOVED <slot> <host>:<port>"; an empty host means the node we asked.
          const std::string_view s(reply.str);
          const size_t sp2 = s.find(' ', code.size() + 1);
          Result<Endpoint> ep = Status::InvalidArgument("no address");
          if (sp2 != std::string_view::npos) {
            std::string_view addr = s.substr(sp2 + 1);
            std::string fixed;
            if (!addr.empty() && addr[0] == ':') {
              fixed = conn->endpoint().host.find(':') != std::string::npos
                          ? "[" + conn->endpoint().host + "]" + std::string(addr)
                          : conn->endpoint().host + std::string(addr);
              addr = fixed;
            }
            ep = ParseHostPort(addr);
          }
          if (!ep.ok()) {
            (*results)[i] = std::move(reply);  // unparseable: hand the error over
            continue;
          }
          const uint16_t target = static_cast<uint16_t>(NodeIndex(*ep));
          if (code == "MOVED") {
            ++stats_.moved;
            owner_[KeySlot(requests[i].key())] = target;
            refresh = true;
            retry.push_back({i, target, false});
          } else {
            ++stats_.ask;
            retry.push_back({i, target, true});
          }
          continue;
        }
        (*results)[i] = std::move(reply);
      }
      g = end;
    }
    pending.swap(retry);
  }
  for (const Pending& p : pending) {
    (*results)[p.index] = Status::Unavailable("redis cluster: redirections did not settle after " +
                                              std::to_string(options_.max_redirects) + " rounds");
  }
  if (refresh) (void)RefreshSlotMap();  // best effort; a failure is counted and retried later
}

}  // namespace redis
}  // namespace lmcache_cpp
