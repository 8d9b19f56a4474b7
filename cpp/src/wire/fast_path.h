// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The server's fast path for the requests engines send on every prompt (PING, LOOKUP,
// QUERY_PREFETCH_STATUS, SYNC_LOOKUP, END_SESSION): the wire format of docs/protocol.md decoded,
// run against the CacheEngine and encoded in C++, which costs a fraction of the Python codec.
//
// It accepts a strict subset of what lmcache_cpp.protocol.decode_request accepts (well-formed
// requests in the shape CacheClient sends them: fixed field types, str map keys, valid UTF-8,
// no duplicate fields) and produces byte for byte the reply the Python dispatcher would.
// Anything else (an unusual but valid request, an invalid one, another request type, a
// SYNC_LOOKUP that needs L2) is declined with nullopt and takes the Python path, which also
// words the errors of malformed requests. tests/test_wire_fast_path.py checks both paths
// against each other, and cpp_tests/wire_fast_path_test.cc tests it on a real engine. Only the
// server's socket thread calls it; the engine is thread-safe. Internal to the build (not
// installed): the module and the fuzzer use it.

#ifndef LMCACHE_CPP_SRC_WIRE_FAST_PATH_H_
#define LMCACHE_CPP_SRC_WIRE_FAST_PATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <optional>
#include <string>
#include <string_view>

#include "lmcache_cpp/cache_engine.h"
#include "lmcache_cpp/chunk_hash.h"

namespace lmcache_cpp::wire {

// Values of lmcache_cpp.protocol.RequestType that the fast path serves. The Python request table
// is the source of truth; tests/test_protocol.py fails when these (kRequestTypes, bound as
// WireFastPath.REQUEST_TYPES) or the constants below drift from it.
enum : uint32_t {
  kPing = 2,
  kLookup = 6,
  kQueryPrefetchStatus = 7,
  kSyncLookup = 9,
  kEndSession = 11,
};
struct NamedRequestType {
  const char* name;
  uint32_t id;
};
inline constexpr NamedRequestType kRequestTypes[] = {
    {"PING", kPing},
    {"LOOKUP", kLookup},
    {"QUERY_PREFETCH_STATUS", kQueryPrefetchStatus},
    {"SYNC_LOOKUP", kSyncLookup},
    {"END_SESSION", kEndSession},
};
constexpr uint64_t kProtocolVersion = 1;
constexpr size_t kHandleSize = 16;
constexpr size_t kMaxErrorMessageChars = 4096;

struct Limits {
  uint64_t max_frame_bytes = 64 << 20;
  uint64_t max_header_bytes = 64;
  uint64_t max_tokens = 1 << 20;
  uint64_t max_string_bytes = 1024;
  double max_wait_s = 300.0;
};

// A msgpack reader over one frame that understands the types requests use; every Read* returns
// false (and leaves the position unspecified) for anything else.
class Reader {
 public:
  explicit Reader(std::string_view data)
      : p_(reinterpret_cast<const uint8_t*>(data.data())), end_(p_ + data.size()) {}

  bool AtEnd() const { return p_ == end_; }
  bool PeekNil() const { return p_ < end_ && *p_ == 0xc0; }
  bool ReadNil() { return PeekNil() && (++p_, true); }

  bool ReadArrayHeader(uint32_t* n) {
    if (p_ >= end_ || (*p_ & 0xf0) != 0x90) return false;  // fixarray only (headers)
    *n = *p_++ & 0x0f;
    return true;
  }
  bool ReadMapHeader(uint32_t* n) {
    if (p_ >= end_ || (*p_ & 0xf0) != 0x80) return false;  // fixmap: at most 15 fields
    *n = *p_++ & 0x0f;
    return true;
  }
  bool ReadBool(bool* v) {
    if (p_ >= end_ || (*p_ != 0xc2 && *p_ != 0xc3)) return false;
    *v = *p_++ == 0xc3;
    return true;
  }
  // Any msgpack int in [lo, hi].
  bool ReadInt(int64_t lo, uint64_t hi, int64_t* out_signed, uint64_t* out_unsigned) {
    if (p_ >= end_) return false;
    const uint8_t t = *p_;
    bool negative = false;
    uint64_t magnitude = 0;  // the value, or for negatives its two's complement bits
    if (t <= 0x7f) {
      magnitude = t;
      ++p_;
    } else if (t >= 0xe0) {
      negative = true;
      magnitude = static_cast<uint64_t>(static_cast<int64_t>(static_cast<int8_t>(t)));
      ++p_;
    } else if (t >= 0xcc && t <= 0xcf) {
      const size_t n = size_t{1} << (t - 0xcc);
      if (!Big(n, &magnitude)) return false;
    } else if (t >= 0xd0 && t <= 0xd3) {
      const size_t n = size_t{1} << (t - 0xd0);
      uint64_t raw = 0;
      if (!Big(n, &raw)) return false;
      const int shift = static_cast<int>(64 - 8 * n);
      const int64_t v = static_cast<int64_t>(raw << shift) >> shift;  // sign-extend
      negative = v < 0;
      magnitude = static_cast<uint64_t>(v);
    } else {
      return false;
    }
    if (negative) {
      const int64_t v = static_cast<int64_t>(magnitude);
      if (v < lo) return false;
      if (out_signed != nullptr) *out_signed = v;
      if (out_unsigned != nullptr) return false;
      return true;
    }
    if (magnitude > hi || (lo > 0 && magnitude < static_cast<uint64_t>(lo))) return false;
    if (out_signed != nullptr) {
      if (magnitude > static_cast<uint64_t>(INT64_MAX)) return false;
      *out_signed = static_cast<int64_t>(magnitude);
    }
    if (out_unsigned != nullptr) *out_unsigned = magnitude;
    return true;
  }
  bool ReadUint(uint64_t lo, uint64_t hi, uint64_t* v) {
    return ReadInt(static_cast<int64_t>(lo), hi, nullptr, v);
  }
  bool ReadSigned(int64_t lo, int64_t hi, int64_t* v) {
    return ReadInt(lo, static_cast<uint64_t>(hi), v, nullptr);
  }
  // A float or an int, as the Python path's number(): finite, in [lo, hi].
  bool ReadNumber(double lo, double hi, double* v) {
    if (p_ >= end_) return false;
    const uint8_t t = *p_;
    if (t == 0xcb || t == 0xca) {
      const size_t n = t == 0xcb ? 8 : 4;
      uint64_t raw = 0;
      if (!Big(n, &raw)) return false;
      if (n == 8) {
        std::memcpy(v, &raw, 8);
      } else {
        const uint32_t r32 = static_cast<uint32_t>(raw);
        float f = 0;
        std::memcpy(&f, &r32, 4);
        *v = f;
      }
    } else {
      int64_t i = 0;
      if (!ReadSigned(INT64_MIN, INT64_MAX, &i)) return false;
      *v = static_cast<double>(i);
    }
    return std::isfinite(*v) && *v >= lo && *v <= hi;
  }
  // A str of valid UTF-8 of at most max_bytes.
  bool ReadStr(uint64_t max_bytes, std::string_view* s) {
    if (p_ >= end_) return false;
    const uint8_t t = *p_;
    uint64_t n = 0;
    if ((t & 0xe0) == 0xa0) {
      n = t & 0x1f;
      ++p_;
    } else if (t >= 0xd9 && t <= 0xdb) {
      if (!Big(size_t{1} << (t - 0xd9), &n)) return false;
    } else {
      return false;
    }
    if (n > max_bytes || n > static_cast<uint64_t>(end_ - p_)) return false;
    *s = std::string_view(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return ValidUtf8(*s);
  }
  bool ReadBin(std::string_view* b) {
    if (p_ >= end_) return false;
    const uint8_t t = *p_;
    uint64_t n = 0;
    if (t < 0xc4 || t > 0xc6) return false;
    if (!Big(size_t{1} << (t - 0xc4), &n)) return false;
    if (n > static_cast<uint64_t>(end_ - p_)) return false;
    *b = std::string_view(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return true;
  }

 private:
  // Skips the type byte and reads an n-byte big-endian unsigned integer.
  bool Big(size_t n, uint64_t* v) {
    if (static_cast<size_t>(end_ - p_) < 1 + n) return false;
    ++p_;
    uint64_t x = 0;
    for (size_t i = 0; i < n; ++i) x = (x << 8) | p_[i];
    p_ += n;
    *v = x;
    return true;
  }
  static bool ValidUtf8(std::string_view s) {
    const auto* p = reinterpret_cast<const uint8_t*>(s.data());
    const auto* e = p + s.size();
    while (p < e) {
      const uint8_t c = *p;
      if (c < 0x80) {
        ++p;
        continue;
      }
      size_t n = 0;
      uint32_t cp = 0;
      if ((c & 0xe0) == 0xc0) {
        n = 1;
        cp = c & 0x1f;
      } else if ((c & 0xf0) == 0xe0) {
        n = 2;
        cp = c & 0x0f;
      } else if ((c & 0xf8) == 0xf0) {
        n = 3;
        cp = c & 0x07;
      } else {
        return false;
      }
      if (static_cast<size_t>(e - p) <= n) return false;
      for (size_t i = 1; i <= n; ++i) {
        if ((p[i] & 0xc0) != 0x80) return false;
        cp = (cp << 6) | (p[i] & 0x3f);
      }
      static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
      if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
      p += n + 1;
    }
    return true;
  }

  const uint8_t* p_;
  const uint8_t* end_;
};

// Msgpack output with the encodings Python's msgpack picks (smallest int, str8 for short
// strings, bin8 for short bytes), so replies match the Python path byte for byte.
class Writer {
 public:
  void FixArray(uint32_t n) { out_.push_back(static_cast<char>(0x90 | n)); }
  void FixMap(uint32_t n) { out_.push_back(static_cast<char>(0x80 | n)); }
  void Bool(bool v) { out_.push_back(static_cast<char>(v ? 0xc3 : 0xc2)); }
  void Uint(uint64_t v) {
    if (v < 0x80) {
      out_.push_back(static_cast<char>(v));
    } else if (v <= 0xff) {
      Tagged(0xcc, v, 1);
    } else if (v <= 0xffff) {
      Tagged(0xcd, v, 2);
    } else if (v <= 0xffffffffu) {
      Tagged(0xce, v, 4);
    } else {
      Tagged(0xcf, v, 8);
    }
  }
  void Str(std::string_view s) {
    const uint64_t n = s.size();
    if (n < 32) {
      out_.push_back(static_cast<char>(0xa0 | n));
    } else if (n <= 0xff) {
      Tagged(0xd9, n, 1);
    } else if (n <= 0xffff) {
      Tagged(0xda, n, 2);
    } else {
      Tagged(0xdb, n, 4);
    }
    out_.append(s);
  }
  void Bin(const uint8_t* data, size_t size) {
    if (size <= 0xff) {
      Tagged(0xc4, size, 1);
    } else if (size <= 0xffff) {
      Tagged(0xc5, size, 2);
    } else {
      Tagged(0xc6, size, 4);
    }
    out_.append(reinterpret_cast<const char*>(data), size);
  }
  std::string Take() { return std::move(out_); }

 private:
  void Tagged(uint8_t tag, uint64_t v, size_t n) {
    out_.push_back(static_cast<char>(tag));
    for (size_t i = n; i-- > 0;) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  std::string out_;
};

struct Reply {
  std::string header;
  std::string payload;
  uint32_t request_type = 0;
  uint32_t status = 0;  // StatusCode; 0 = ok
  uint64_t seq = 0;     // the request's, echoed in the header
};

class FastPath {
 public:
  FastPath(CacheEngine* engine, Limits limits, bool has_l2)
      : engine_(engine), limits_(limits), has_l2_(has_l2) {}

  // The reply to a request it serves; nullopt: the Python dispatcher takes the request.
  // Runs the engine call, so call it without the GIL.
  std::optional<Reply> Handle(ClientId client, std::string_view header,
                              std::string_view payload) const {
    if (header.size() > limits_.max_header_bytes || payload.size() > limits_.max_frame_bytes) {
      return std::nullopt;
    }
    Reader h(header);
    uint32_t n = 0;
    uint64_t version = 0, type = 0, seq = 0;
    if (!h.ReadArrayHeader(&n) || n != 3 || !h.ReadUint(0, UINT64_MAX, &version) ||
        version != kProtocolVersion || !h.ReadUint(0, UINT32_MAX, &type) ||
        !h.ReadUint(0, UINT64_MAX, &seq) || !h.AtEnd()) {
      return std::nullopt;
    }
    Reader r(payload);
    // Nothing escapes to the socket thread: a request whose work cannot be allocated (or that
    // trips any other exception) gets an error reply, and the server keeps serving.
    try {
      switch (type) {
        case kPing: {
          uint32_t fields = 0;
          if (!r.ReadMapHeader(&fields) || fields != 0 || !r.AtEnd()) return std::nullopt;
          Writer w;
          w.FixMap(0);
          return Ok(kPing, seq, w.Take());
        }
        case kLookup:
        case kSyncLookup: return KeyRequest(client, static_cast<uint32_t>(type), seq, &r);
        case kQueryPrefetchStatus: return Query(client, seq, &r);
        case kEndSession: return EndSessionRequest(client, seq, &r);
        default: return std::nullopt;
      }
    } catch (const std::bad_alloc&) {
      return Error(static_cast<uint32_t>(type), seq,
                   Status::ResourceExhausted("the server ran out of memory for this request"));
    } catch (const std::exception& e) {
      return Error(static_cast<uint32_t>(type), seq,
                   Status::Internal(std::string("request failed: ") + e.what()));
    }
  }

 private:
  struct Key {
    EngineKey key;
    int64_t end = -1;
    bool has_tokens = false, has_hashes = false;
  };

  // Reads the key map; false (decline) unless it is well formed.
  bool ReadKey(Reader* r, Key* out) const {
    uint32_t fields = 0;
    if (!r->ReadMapHeader(&fields)) return false;
    uint32_t seen = 0;
    EngineKey& k = out->key;
    k.world_size = 1;
    k.worker_id = -1;
    k.block_hash_size = 32;
    k.start = 0;
    std::string_view data;
    const uint64_t s = limits_.max_string_bytes;
    for (uint32_t i = 0; i < fields; ++i) {
      std::string_view name;
      if (!r->ReadStr(s, &name)) return false;
      const uint32_t bit = KeyFieldBit(name);
      if (bit == 0 || (seen & bit) != 0) return false;
      seen |= bit;
      if (r->ReadNil()) {  // nil = the default
        if (bit == kModelName) return false;
        continue;
      }
      uint64_t u = 0;
      int64_t v = 0;
      switch (bit) {
        case kModelName:
          if (!r->ReadStr(s, &k.model_name) || k.model_name.empty()) return false;
          break;
        case kWorldSize:
          if (!r->ReadUint(1, UINT32_MAX, &u)) return false;
          k.world_size = static_cast<uint32_t>(u);
          break;
        case kWorkerId:
          if (!r->ReadSigned(-1, INT32_MAX, &v)) return false;
          k.worker_id = static_cast<int32_t>(v);
          break;
        case kRequestId:
          if (!r->ReadStr(s, &k.request_id)) return false;
          break;
        case kCacheSalt:
          if (!r->ReadStr(s, &k.cache_salt)) return false;
          break;
        case kTokens:
          if (!r->ReadBin(&data)) return false;
          out->has_tokens = true;
          break;
        case kBlockHashes:
          if (!r->ReadBin(&data)) return false;
          out->has_hashes = true;
          break;
        case kBlockHashSize:
          if (!r->ReadUint(1, kMaxBlockHashSize, &u)) return false;
          k.block_hash_size = static_cast<uint32_t>(u);
          break;
        case kStart:
          if (!r->ReadUint(0, INT64_MAX, &u)) return false;
          k.start = u;
          break;
        case kEnd:
          if (!r->ReadSigned(-1, INT64_MAX, &out->end)) return false;
          break;
      }
    }
    if ((seen & kModelName) == 0 || out->has_tokens == out->has_hashes) return false;
    if (k.worker_id >= 0 && static_cast<uint32_t>(k.worker_id) >= k.world_size) return false;
    uint64_t count = 0;
    if (out->has_tokens) {
      if (data.size() % 4 != 0) return false;
      count = data.size() / 4;
      k.mode = KeyMode::kTokens;
    } else {
      if (data.size() % k.block_hash_size != 0) return false;
      count = data.size() / k.block_hash_size;
      k.mode = KeyMode::kBlockHashes;
    }
    if (count > limits_.max_tokens) return false;
    if (out->end != -1 && static_cast<uint64_t>(out->end) < k.start) return false;
    k.data = reinterpret_cast<const uint8_t*>(data.data());
    k.size = data.size();
    k.end = out->end < 0 ? UINT64_MAX : static_cast<uint64_t>(out->end);
    return true;
  }

  enum : uint32_t {
    kModelName = 1,
    kWorldSize = 2,
    kWorkerId = 4,
    kRequestId = 8,
    kCacheSalt = 16,
    kTokens = 32,
    kBlockHashes = 64,
    kBlockHashSize = 128,
    kStart = 256,
    kEnd = 512,
  };
  static uint32_t KeyFieldBit(std::string_view name) {
    if (name == "model_name") return kModelName;
    if (name == "world_size") return kWorldSize;
    if (name == "worker_id") return kWorkerId;
    if (name == "request_id") return kRequestId;
    if (name == "cache_salt") return kCacheSalt;
    if (name == "tokens") return kTokens;
    if (name == "block_hashes") return kBlockHashes;
    if (name == "block_hash_size") return kBlockHashSize;
    if (name == "start") return kStart;
    if (name == "end") return kEnd;
    return 0;
  }

  // LOOKUP {key, tp_size} and SYNC_LOOKUP {key, tp_size, timeout_s}.
  std::optional<Reply> KeyRequest(ClientId client, uint32_t type, uint64_t seq, Reader* r) const {
    uint32_t fields = 0;
    if (!r->ReadMapHeader(&fields)) return std::nullopt;
    Key key;
    bool have_key = false, have_tp = false, have_timeout = false;
    uint64_t tp_size = 1;
    std::optional<double> timeout_s;
    for (uint32_t i = 0; i < fields; ++i) {
      std::string_view name;
      if (!r->ReadStr(limits_.max_string_bytes, &name)) return std::nullopt;
      if (name == "key" && !have_key) {
        have_key = true;
        if (!ReadKey(r, &key)) return std::nullopt;
      } else if (name == "tp_size" && !have_tp) {
        have_tp = true;
        if (!r->ReadNil() && !r->ReadUint(1, UINT32_MAX, &tp_size)) return std::nullopt;
      } else if (name == "timeout_s" && type == kSyncLookup && !have_timeout) {
        have_timeout = true;
        double t = 0;
        if (r->ReadNil()) continue;
        if (!r->ReadNumber(0.0, limits_.max_wait_s, &t)) return std::nullopt;
        timeout_s = t;
      } else {
        return std::nullopt;
      }
    }
    if (!have_key || !r->AtEnd()) return std::nullopt;
    const auto tp = static_cast<uint32_t>(tp_size);
    if (type == kLookup) {
      Result<JobHandle> h = engine_->Lookup(client, key.key, tp);
      if (!h.ok()) return Error(type, seq, h.status());
      Writer w;
      w.FixMap(1);
      w.Str("handle");
      w.Bin(h->bytes.data(), h->bytes.size());
      return Ok(type, seq, w.Take());
    }
    Result<LookupResult> result = Status::Ok();
    if (has_l2_) {
      // With L2 only a key L1 holds wholly is answered here (timeout_s, the L2 deadline, does
      // not apply); the rest goes to the pool.
      Result<std::optional<LookupResult>> in_l1 = engine_->SyncLookupInL1(client, key.key, tp);
      if (!in_l1.ok()) return std::nullopt;  // the pool path words the error
      if (!in_l1->has_value()) return std::nullopt;
      result = **in_l1;
    } else {
      std::optional<Duration> deadline;
      if (timeout_s.has_value()) {
        deadline = std::chrono::duration_cast<Duration>(std::chrono::duration<double>(*timeout_s));
      }
      result = engine_->SyncLookup(client, key.key, tp, deadline);
    }
    if (!result.ok()) return Error(type, seq, result.status());
    Writer w;
    WriteHits(&w, *result, false);
    return Ok(type, seq, w.Take());
  }

  std::optional<Reply> Query(ClientId client, uint64_t seq, Reader* r) const {
    uint32_t fields = 0;
    std::string_view name, handle;
    if (!r->ReadMapHeader(&fields) || fields != 1 || !r->ReadStr(16, &name) || name != "handle" ||
        !r->ReadBin(&handle) || handle.size() != kHandleSize || !r->AtEnd()) {
      return std::nullopt;
    }
    JobHandle h;
    std::memcpy(h.bytes.data(), handle.data(), kHandleSize);
    auto result = engine_->QueryPrefetch(client, h);
    if (!result.ok()) return Error(kQueryPrefetchStatus, seq, result.status());
    Writer w;
    if (!result->has_value()) {
      w.FixMap(1);
      w.Str("ready");
      w.Bool(false);
    } else {
      WriteHits(&w, **result, true);
    }
    return Ok(kQueryPrefetchStatus, seq, w.Take());
  }

  std::optional<Reply> EndSessionRequest(ClientId client, uint64_t seq, Reader* r) const {
    uint32_t fields = 0;
    if (!r->ReadMapHeader(&fields)) return std::nullopt;
    std::string_view model, request;
    bool have_model = false, have_request = false;
    for (uint32_t i = 0; i < fields; ++i) {
      std::string_view name;
      if (!r->ReadStr(limits_.max_string_bytes, &name)) return std::nullopt;
      if (name == "model_name" && !have_model) {
        have_model = true;
        if (!r->ReadStr(limits_.max_string_bytes, &model) || model.empty()) return std::nullopt;
      } else if (name == "request_id" && !have_request) {
        have_request = true;
        if (!r->ReadStr(limits_.max_string_bytes, &request)) return std::nullopt;
      } else {
        return std::nullopt;
      }
    }
    if (!have_model || !have_request || !r->AtEnd()) return std::nullopt;
    const Result<uint64_t> released = engine_->EndSession(client, model, request);
    if (!released.ok()) return Error(kEndSession, seq, released.status());
    Writer w;
    w.FixMap(1);
    w.Str("released");
    w.Uint(*released);
    return Ok(kEndSession, seq, w.Take());
  }

  static void WriteHits(Writer* w, const LookupResult& r, bool ready_field) {
    w->FixMap(ready_field ? 5 : 4);
    if (ready_field) {
      w->Str("ready");
      w->Bool(true);
    }
    w->Str("hit_chunks");
    w->Uint(r.hit_chunks);
    w->Str("hit_tokens");
    w->Uint(r.hit_tokens);
    w->Str("l1_chunks");
    w->Uint(r.l1_chunks);
    w->Str("l2_chunks");
    w->Uint(r.l2_chunks);
  }

  static std::string Header(uint32_t type, uint64_t seq, uint32_t status) {
    Writer w;
    w.FixArray(4);
    w.Uint(kProtocolVersion);
    w.Uint(type);
    w.Uint(seq);
    w.Uint(status);
    return w.Take();
  }
  static Reply Ok(uint32_t type, uint64_t seq, std::string payload) {
    return Reply{Header(type, seq, 0), std::move(payload), type, 0, seq};
  }
  // The error reply: {"message": ...}, cut to kMaxErrorMessageChars characters as in Python.
  static Reply Error(uint32_t type, uint64_t seq, const Status& status) {
    std::string message = status.message();
    size_t chars = 0, cut = std::string::npos, cut3 = std::string::npos;
    for (size_t i = 0; i < message.size(); ++i) {
      if ((static_cast<uint8_t>(message[i]) & 0xc0) == 0x80) continue;  // continuation byte
      if (chars == kMaxErrorMessageChars - 3) cut3 = i;
      if (chars == kMaxErrorMessageChars) cut = i;
      ++chars;
    }
    if (cut != std::string::npos) message = message.substr(0, cut3) + "...";
    Writer w;
    w.FixMap(1);
    w.Str("message");
    w.Str(message);
    const auto code = static_cast<uint32_t>(status.code());
    return Reply{Header(type, seq, code), w.Take(), type, code, seq};
  }

  CacheEngine* engine_;
  Limits limits_;
  bool has_l2_;
};

}  // namespace lmcache_cpp::wire

#endif  // LMCACHE_CPP_SRC_WIRE_FAST_PATH_H_
