// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// libFuzzer target: the RESP reply parser of the Redis client (cpp/src/redis/resp.h) over a
// server's byte stream made of fuzzer bytes, with bulk-string sinks queued as the Redis L2 tier
// queues them for its GETs.
//
// Input:
//   options:u8  sinks:u8  then per sink (sinks % 5 of them) head:u8 body:u8  then split:u8
//   then the stream (every byte left).
// options bit 0 picks tight limits (line 24, bulk 48, 6 elements, depth 3) instead of the
// defaults. A sink has head % 41 head bytes and `body` body bytes. The stream is parsed three
// ways, each by a fresh reader with its own sinks: fed at once; fed in pieces of 1..64 bytes
// drawn from `split` (a small LCG; split 0 means one byte at a time); and through the zero-copy
// path (ReadTargets/Commit, at most the same piece sizes per "read").
//
// Checks: the three ways return the same replies (type, integer, text, sink outcome, length,
// elements) and the same error state, and leave the same bytes in their sinks; a filled sink's
// reply has exactly the sink's length and a mismatch a different one; a mismatched reply never
// writes its sink's body, and a sink no reply used is untouched. Any failure aborts.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "redis/resp.h"

namespace {

using lmcache_cpp::Result;
using lmcache_cpp::redis::BulkSink;
using lmcache_cpp::redis::ReaderLimits;
using lmcache_cpp::redis::Reply;
using lmcache_cpp::redis::ReplyReader;
using lmcache_cpp::redis::ReplyType;
using lmcache_cpp::redis::SinkOutcome;

constexpr uint8_t kPattern = 0xA5;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "redis_resp_fuzzer: check failed: %s\n", what);
    std::abort();
  }
}

void Describe(const Reply& r, std::string* out) {
  out->push_back(static_cast<char>('A' + static_cast<int>(r.type)));
  *out += std::to_string(r.integer) + "|" + std::to_string(r.str.size()) + ":" + r.str + "|" +
          std::to_string(static_cast<int>(r.sink)) + "|" + std::to_string(r.length) + "[";
  for (const Reply& e : r.elements) Describe(e, out);
  out->push_back(']');
}

struct SinkSpec {
  size_t head;
  size_t body;
};

struct Outcome {
  std::string replies;
  bool error = false;
  std::vector<std::vector<uint8_t>> heads, bodies;
};

enum class Mode { kWhole, kPieces, kZeroCopy };

Outcome Run(Mode mode, const ReaderLimits& limits, const std::vector<SinkSpec>& specs,
            const uint8_t* data, size_t size, uint8_t split) {
  Outcome o;
  std::vector<BulkSink> sinks;
  for (const SinkSpec& s : specs) {
    o.heads.emplace_back(s.head, kPattern);
    o.bodies.emplace_back(s.body, kPattern);
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    sinks.push_back({o.heads[i].data(), specs[i].head, o.bodies[i].data(), specs[i].body});
  }
  ReplyReader reader(limits);
  for (const BulkSink& s : sinks) reader.Expect(&s);
  size_t used_sinks = 0;
  std::vector<SinkOutcome> outcomes;
  auto drain = [&]() {
    for (;;) {
      Reply r;
      Result<bool> got = reader.Next(&r);
      if (!got.ok()) {
        o.error = true;
        return;
      }
      if (!*got) return;
      Describe(r, &o.replies);
      if (r.type == ReplyType::kPush) continue;  // pushes take no sink
      if (used_sinks < sinks.size()) {
        const BulkSink& s = sinks[used_sinks];
        if (r.sink == SinkOutcome::kFilled) Check(r.length == s.total(), "filled length");
        if (r.sink == SinkOutcome::kMismatch) Check(r.length != s.total(), "mismatch length");
        outcomes.push_back(r.sink);
      } else {
        Check(r.sink == SinkOutcome::kNone, "a sink used without one queued");
      }
      ++used_sinks;
    }
  };
  uint32_t lcg = split;
  auto piece = [&]() -> size_t {
    if (split == 0) return 1;
    lcg = lcg * 1103515245u + 12345u;
    return 1 + (lcg >> 16) % 64;
  };
  size_t pos = 0;
  while (pos < size && !o.error) {
    if (mode == Mode::kWhole) {
      reader.Feed(data, size);
      pos = size;
    } else if (mode == Mode::kPieces) {
      const size_t n = std::min(piece(), size - pos);
      reader.Feed(data + pos, n);
      pos += n;
    } else {
      iovec t[2];
      const int k = reader.ReadTargets(t);
      size_t n = std::min(piece(), size - pos), done = 0;
      for (int i = 0; i < k && done < n; ++i) {
        const size_t m = std::min(n - done, t[i].iov_len);
        std::memcpy(t[i].iov_base, data + pos + done, m);
        done += m;
      }
      reader.Commit(done);
      pos += done;
    }
    drain();
  }
  // Sinks a mismatch or no reply used keep their bodies (a mismatch may only fill the head).
  for (size_t i = 0; i < sinks.size(); ++i) {
    const bool filled = i < outcomes.size() && outcomes[i] == SinkOutcome::kFilled;
    const bool in_progress = i == outcomes.size();  // the stream may end inside this reply
    if (filled || in_progress) continue;
    for (uint8_t b : o.bodies[i]) Check(b == kPattern, "an unused or mismatched sink's body");
    if (i >= outcomes.size() || outcomes[i] == SinkOutcome::kNone) {
      for (uint8_t b : o.heads[i]) Check(b == kPattern, "an unused sink's head");
    }
  }
  return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const uint8_t options = data[0];
  const size_t n_sinks = data[1] % 5;
  size_t pos = 2;
  if (size < pos + 2 * n_sinks + 1) return 0;
  std::vector<SinkSpec> specs;
  for (size_t i = 0; i < n_sinks; ++i, pos += 2) specs.push_back({data[pos] % 41u, data[pos + 1]});
  const uint8_t split = data[pos++];
  ReaderLimits limits;
  if (options & 1) {
    limits.max_line = 24;
    limits.max_bulk = 48;
    limits.max_elements = 6;
    limits.max_depth = 3;
  }
  const uint8_t* stream = data + pos;
  const size_t len = size - pos;
  const Outcome whole = Run(Mode::kWhole, limits, specs, stream, len, split);
  const Outcome pieces = Run(Mode::kPieces, limits, specs, stream, len, split);
  const Outcome direct = Run(Mode::kZeroCopy, limits, specs, stream, len, split);
  for (const Outcome* other : {&pieces, &direct}) {
    Check(other->error == whole.error, "error state differs with the split");
    Check(other->replies == whole.replies, "replies differ with the split");
    Check(other->heads == whole.heads && other->bodies == whole.bodies,
          "sink bytes differ with the split");
  }
  return 0;
}
