// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// RESP (the Redis serialization protocol, versions 2 and 3): the encoder of pipelined commands
// and the incremental reply parser of the Redis L2 client (docs/design/redis.md). Internal to the
// core (not installed).
//
// Encoding: a command is an array of bulk strings ("*<argc>\r\n" then "$<len>\r\n<bytes>\r\n" per
// argument). EncodedBatch copies the framing and small arguments into one buffer it owns and
// only references large argument pieces (a value's payload), so a 32 MiB SET is sent with
// writev/sendmsg straight from the caller's memory.
//
// Decoding: ReplyReader takes bytes in any split (one byte at a time, or many replies at once)
// and returns whole replies in order. Its limits (line length, bulk size, elements, depth) turn a
// hostile or broken stream into a Corruption status, never into unbounded memory. A top-level
// bulk-string reply can be received straight into caller memory: before the reply arrives the
// caller queues a BulkSink (e.g. a value header buffer and the L1 object) with Expect(); the
// reader then asks, through ReadTargets(), for the socket bytes of that payload to be read into
// the sink itself. Only a bulk of exactly the sink's size is written in full; any other length is
// a mismatch (its first bytes land in the head so the caller can tell why) and never success.
//
// Thread safety: values and single-owner objects; one thread at a time per object.
#ifndef LMCACHE_CPP_SRC_REDIS_RESP_H_
#define LMCACHE_CPP_SRC_REDIS_RESP_H_

#include <sys/uio.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace redis {

// One command argument: up to two pieces sent back to back as one bulk string (a value's header,
// then its payload). Views into the caller's memory, which must stay valid and unchanged until the
// command has been sent (Connection::Execute returns).
struct Arg {
  const uint8_t* data = nullptr;
  size_t size = 0;
  const uint8_t* data2 = nullptr;
  size_t size2 = 0;

  Arg() = default;
  Arg(std::string_view s)  // NOLINT(google-explicit-constructor)
      : data(reinterpret_cast<const uint8_t*>(s.data())), size(s.size()) {}
  Arg(const char* s) : Arg(std::string_view(s)) {}         // NOLINT(google-explicit-constructor)
  Arg(const std::string& s) : Arg(std::string_view(s)) {}  // NOLINT(google-explicit-constructor)
  Arg(const void* d, size_t n) : data(static_cast<const uint8_t*>(d)), size(n) {}
  static Arg Pieces(const void* a, size_t na, const void* b, size_t nb) {
    Arg arg(a, na);
    arg.data2 = static_cast<const uint8_t*>(b);
    arg.size2 = nb;
    return arg;
  }
  uint64_t total() const { return static_cast<uint64_t>(size) + size2; }
};

// Where a top-level bulk-string reply goes: its first head_size bytes into `head`, the next
// body_size bytes into `body`. Used only by a bulk of exactly head_size + body_size bytes.
struct BulkSink {
  uint8_t* head = nullptr;
  size_t head_size = 0;
  uint8_t* body = nullptr;
  uint64_t body_size = 0;
  uint64_t total() const { return head_size + body_size; }
};

inline constexpr size_t kMaxArgs = 8;

// One command of a pipeline. Fixed size (no heap): argument views, the index of the key argument
// (the cluster client routes on it; 0 = no key), and an optional sink for its reply.
struct Request {
  std::array<Arg, kMaxArgs> args{};
  uint8_t argc = 0;
  uint8_t key_index = 1;
  bool has_sink = false;
  BulkSink sink;

  // REQUIRES: args.size() <= kMaxArgs (extra arguments are dropped).
  static Request Of(std::initializer_list<Arg> list) {
    Request r;
    for (const Arg& a : list) {
      if (r.argc == kMaxArgs) break;
      r.args[r.argc++] = a;
    }
    if (r.argc < 2) r.key_index = 0;
    return r;
  }
  Request& Into(const BulkSink& s) {
    sink = s;
    has_sink = true;
    return *this;
  }
  std::string_view key() const {
    if (key_index == 0 || key_index >= argc) return {};
    return {reinterpret_cast<const char*>(args[key_index].data), args[key_index].size};
  }
};

// Argument pieces smaller than this are copied into the batch buffer; larger ones are referenced.
inline constexpr size_t kCopyThreshold = 4096;

// The bytes of a pipelined batch of commands, as a gather list.
class EncodedBatch {
 public:
  void Clear();
  void Append(const Request& request);
  uint64_t size_bytes() const { return bytes_; }
  // The gather list of every byte appended so far, in order. Valid until the next Append/Clear;
  // the referenced pieces must still be alive.
  const std::vector<iovec>& iovecs();
  // Every byte, concatenated (tests).
  std::string Flatten();

 private:
  struct Segment {
    const uint8_t* external;  // null: [offset, offset + size) of small_
    size_t offset;
    size_t size;
  };
  void Copy(const void* data, size_t n);
  void Reference(const uint8_t* data, size_t n);

  std::string small_;
  std::vector<Segment> segments_;
  std::vector<iovec> iov_;
  uint64_t bytes_ = 0;
};

enum class ReplyType : uint8_t {
  kNull,          // RESP2 "$-1"/"*-1", RESP3 "_"
  kSimpleString,  // "+OK"
  kError,         // "-ERR ...", RESP3 blob error "!"
  kInteger,       // ":"
  kBulkString,    // "$"; RESP3 verbatim "=" (with its "txt:" prefix)
  kArray,         // "*"
  kMap,           // RESP3 "%": elements hold key, value, key, value, ...
  kSet,           // RESP3 "~"
  kPush,          // RESP3 ">" (out-of-band; a connection skips top-level pushes)
  kDouble,        // RESP3 ",": the text in `str`
  kBoolean,       // RESP3 "#": integer 0 or 1
  kBigNumber,     // RESP3 "(": the digits in `str`
};

const char* ReplyTypeName(ReplyType type);

enum class SinkOutcome : uint8_t {
  kNone,      // no sink was used (not a bulk string, or none queued)
  kFilled,    // the bulk was exactly the sink's size and fills it; `str` is empty
  kMismatch,  // the bulk's length (`length`) differs: min(length, head_size) bytes are in the
              // head, the rest was dropped; the body holds no meaningful bytes
};

struct Reply {
  ReplyType type = ReplyType::kNull;
  int64_t integer = 0;
  std::string str;
  std::vector<Reply> elements;
  SinkOutcome sink = SinkOutcome::kNone;
  uint64_t length = 0;  // bulk-string length (also when sunk)

  bool is_error() const { return type == ReplyType::kError; }
  bool is_null() const { return type == ReplyType::kNull; }
  bool IsStatus(std::string_view s) const { return type == ReplyType::kSimpleString && str == s; }
  // For logs: "OK", "(error) ...", "(integer) 3", "(bulk 6291488)", "(array 3)", ...
  std::string ToString() const;
};

struct ReaderLimits {
  size_t max_line = 64 << 10;        // a simple string, error, number or header line
  uint64_t max_bulk = 512ull << 20;  // a bulk string kept in memory (sinks are sized by caller)
  size_t max_elements = 1 << 20;     // elements of one aggregate
  size_t max_depth = 16;             // nesting of aggregates
};

// Reads at most this many bytes into the internal buffer while a sink is queued or being filled,
// so a sunk payload never passes through the buffer: "$<len>\r\n" fits, the payload is read into
// the sink directly.
inline constexpr size_t kSinkGuardRead = 16;

class ReplyReader {
 public:
  explicit ReplyReader(ReaderLimits limits = {});

  // Drops buffered bytes, the parse state and every queued sink (after a connection is lost).
  void Reset();

  // Queues what the next top-level reply (pushes excepted) does with a bulk string: `sink` null
  // keeps it in Reply::str. Call once per command sent, in order. The sink's memory must stay
  // valid until that reply has been returned or Reset() is called.
  void Expect(const BulkSink* sink);
  size_t expected() const { return sinks_.size() + (reply_started_ ? 1 : 0); }

  // Input, copying: appends bytes (tests, and TLS records already decrypted).
  void Feed(const void* data, size_t n);
  // Input, zero-copy: fills `out` (2 entries) with where the next socket read should put bytes
  // (the sink for a payload in progress, then the internal buffer) and returns how many entries
  // it used (1 or 2). Then Commit(n) with the number of bytes read. REQUIRES: nothing between.
  int ReadTargets(iovec* out);
  void Commit(size_t n);

  // Parses what has arrived. Returns true and fills `out` when a whole top-level reply is ready,
  // false when more input is needed, or Corruption on a protocol violation or exceeded limit
  // (the stream is then unusable: Reset() before reuse).
  Result<bool> Next(Reply* out);

  size_t buffered() const { return end_ - begin_; }
  // Bytes of sunk bulk strings that went straight from the input into a sink.
  uint64_t direct_bytes() const { return direct_bytes_; }

 private:
  enum class State : uint8_t { kHeader, kBulkBody, kBulkCrlf };
  enum class BulkMode : uint8_t { kString, kSink, kMismatch };
  struct Frame {
    Reply reply;
    uint64_t remaining;
    bool attribute;  // RESP3 "|": parsed, then dropped
  };

  Result<bool> ParseHeader(Reply* out, bool* emitted);
  // Finishes a value: adds it to its parent, or emits it. Returns true when `out` was filled.
  bool Complete(Reply value, Reply* out);
  void SinkWrite(const uint8_t* data, uint64_t n);
  void Reserve(size_t free_bytes);
  // True when the next bytes may belong to a sunk payload: reads into the buffer stay small.
  bool guard_reads() const {
    return (state_ == State::kHeader && !sinks_.empty()) || bulk_mode_ == BulkMode::kSink;
  }

  ReaderLimits limits_;
  std::vector<uint8_t> buf_;
  size_t begin_ = 0, end_ = 0;
  State state_ = State::kHeader;
  std::vector<Frame> stack_;
  struct Expected {
    bool has_sink;
    BulkSink sink;
  };
  // What each queued reply does with a bulk string; front = the next top-level reply.
  std::deque<Expected> sinks_;
  bool reply_started_ = false;  // a top-level reply is being parsed (its sink was popped)
  bool cur_has_sink_ = false;
  BulkSink cur_sink_;
  // The bulk string in progress.
  Reply bulk_;
  BulkMode bulk_mode_ = BulkMode::kString;
  uint64_t bulk_pos_ = 0, bulk_len_ = 0;
  bool direct_ = false;  // the last ReadTargets pointed into the sink
  size_t direct_len_ = 0;
  uint64_t direct_bytes_ = 0;
};

}  // namespace redis
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_REDIS_RESP_H_
