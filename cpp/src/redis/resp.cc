// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "redis/resp.h"

#include <algorithm>
#include <charconv>
#include <cstring>
#include <limits>
#include <utility>

namespace lmcache_cpp {
namespace redis {
namespace {

// Appends "<prefix><v>\r\n" to `out`.
void AppendHeader(std::string* out, char prefix, uint64_t v) {
  char tmp[24];
  tmp[0] = prefix;
  char* end = std::to_chars(tmp + 1, tmp + sizeof(tmp) - 2, v).ptr;
  *end++ = '\r';
  *end++ = '\n';
  out->append(tmp, static_cast<size_t>(end - tmp));
}

// Parses a whole signed decimal integer; false on anything else (empty, sign only, overflow).
bool ParseInt(std::string_view s, int64_t* out) {
  if (s.empty()) return false;
  bool neg = false;
  size_t i = 0;
  if (s[0] == '-' || s[0] == '+') {
    neg = s[0] == '-';
    i = 1;
    if (s.size() == 1) return false;
  }
  uint64_t v = 0;
  const uint64_t limit = neg ? uint64_t{1} << 63 : (uint64_t{1} << 63) - 1;
  for (; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
    const uint64_t d = static_cast<uint64_t>(s[i] - '0');
    if (v > (limit - d) / 10) return false;
    v = v * 10 + d;
  }
  *out = neg ? static_cast<int64_t>(0 - v) : static_cast<int64_t>(v);
  return true;
}

Status Violation(const std::string& what) {
  return Status::Corruption("RESP protocol violation: " + what);
}

}  // namespace

// ---------------------------------------------------------------------------
// EncodedBatch

void EncodedBatch::Clear() {
  small_.clear();
  segments_.clear();
  iov_.clear();
  bytes_ = 0;
}

void EncodedBatch::Copy(const void* data, size_t n) {
  if (n == 0) return;
  if (!segments_.empty() && segments_.back().external == nullptr &&
      segments_.back().offset + segments_.back().size == small_.size()) {
    segments_.back().size += n;  // extend the last copied segment
  } else {
    segments_.push_back({nullptr, small_.size(), n});
  }
  small_.append(static_cast<const char*>(data), n);
  bytes_ += n;
}

void EncodedBatch::Reference(const uint8_t* data, size_t n) {
  if (n == 0) return;
  if (n < kCopyThreshold) {
    Copy(data, n);
    return;
  }
  segments_.push_back({data, 0, n});
  bytes_ += n;
}

void EncodedBatch::Append(const Request& request) {
  std::string head;
  AppendHeader(&head, '*', request.argc);
  for (uint8_t i = 0; i < request.argc; ++i) {
    const Arg& a = request.args[i];
    AppendHeader(&head, '$', a.total());
    Copy(head.data(), head.size());
    head.clear();
    Reference(a.data, a.size);
    Reference(a.data2, a.size2);
    Copy("\r\n", 2);
  }
  Copy(head.data(), head.size());  // a command without arguments
}

const std::vector<iovec>& EncodedBatch::iovecs() {
  iov_.clear();
  iov_.reserve(segments_.size());
  for (const Segment& s : segments_) {
    const uint8_t* p = s.external != nullptr
                           ? s.external
                           : reinterpret_cast<const uint8_t*>(small_.data()) + s.offset;
    iov_.push_back({const_cast<uint8_t*>(p), s.size});
  }
  return iov_;
}

std::string EncodedBatch::Flatten() {
  std::string out;
  out.reserve(bytes_);
  for (const iovec& v : iovecs()) out.append(static_cast<const char*>(v.iov_base), v.iov_len);
  return out;
}

// ---------------------------------------------------------------------------
// Reply

const char* ReplyTypeName(ReplyType type) {
  switch (type) {
    case ReplyType::kNull: return "null";
    case ReplyType::kSimpleString: return "simple-string";
    case ReplyType::kError: return "error";
    case ReplyType::kInteger: return "integer";
    case ReplyType::kBulkString: return "bulk-string";
    case ReplyType::kArray: return "array";
    case ReplyType::kMap: return "map";
    case ReplyType::kSet: return "set";
    case ReplyType::kPush: return "push";
    case ReplyType::kDouble: return "double";
    case ReplyType::kBoolean: return "boolean";
    case ReplyType::kBigNumber: return "big-number";
  }
  return "unknown";
}

std::string Reply::ToString() const {
  switch (type) {
    case ReplyType::kNull: return "(nil)";
    case ReplyType::kSimpleString: return str;
    case ReplyType::kError: return "(error) " + str;
    case ReplyType::kInteger:
    case ReplyType::kBoolean: return "(integer) " + std::to_string(integer);
    case ReplyType::kBulkString:
      if (sink == SinkOutcome::kNone && str.size() <= 64) return "\"" + str + "\"";
      return "(bulk " + std::to_string(length) + ")";
    case ReplyType::kDouble:
    case ReplyType::kBigNumber: return str;
    default:
      return std::string("(") + ReplyTypeName(type) + " " + std::to_string(elements.size()) + ")";
  }
}

// ---------------------------------------------------------------------------
// ReplyReader

ReplyReader::ReplyReader(ReaderLimits limits) : limits_(limits) {}

void ReplyReader::Reset() {
  begin_ = end_ = 0;
  state_ = State::kHeader;
  stack_.clear();
  sinks_.clear();
  reply_started_ = false;
  cur_has_sink_ = false;
  bulk_ = Reply();
  bulk_mode_ = BulkMode::kString;
  bulk_pos_ = bulk_len_ = 0;
  direct_ = false;
  direct_len_ = 0;
}

void ReplyReader::Expect(const BulkSink* sink) {
  sinks_.push_back(sink != nullptr ? Expected{true, *sink} : Expected{false, BulkSink()});
}

void ReplyReader::Reserve(size_t free_bytes) {
  if (begin_ == end_) begin_ = end_ = 0;
  if (buf_.size() - end_ >= free_bytes) return;
  if (begin_ > 0) {  // compact
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (buf_.size() - end_ < free_bytes) buf_.resize(std::max(end_ + free_bytes, buf_.size() * 2));
}

void ReplyReader::Feed(const void* data, size_t n) {
  Reserve(n);
  std::memcpy(buf_.data() + end_, data, n);
  end_ += n;
}

int ReplyReader::ReadTargets(iovec* out) {
  constexpr size_t kChunk = 64 << 10;
  int used = 0;
  direct_ = false;
  direct_len_ = 0;
  if (state_ == State::kBulkBody && bulk_mode_ == BulkMode::kSink && begin_ == end_) {
    const uint64_t pos = bulk_pos_;
    uint8_t* p;
    uint64_t n;
    if (pos < cur_sink_.head_size) {
      p = cur_sink_.head + pos;
      n = cur_sink_.head_size - pos;
    } else {
      p = cur_sink_.body + (pos - cur_sink_.head_size);
      n = bulk_len_ - pos;
    }
    n = std::min<uint64_t>(n, std::numeric_limits<int32_t>::max());
    out[used++] = {p, static_cast<size_t>(n)};
    direct_ = true;
    direct_len_ = static_cast<size_t>(n);
  }
  const size_t want = guard_reads() ? kSinkGuardRead : kChunk;
  Reserve(want);
  out[used++] = {buf_.data() + end_, want};
  return used;
}

void ReplyReader::Commit(size_t n) {
  if (direct_) {
    const size_t d = std::min(n, direct_len_);
    bulk_pos_ += d;
    direct_bytes_ += d;
    n -= d;
    if (bulk_pos_ == bulk_len_) state_ = State::kBulkCrlf;
    direct_ = false;
  }
  end_ += n;
}

void ReplyReader::SinkWrite(const uint8_t* data, uint64_t n) {
  // Bytes [bulk_pos_, bulk_pos_ + n) of the bulk.
  if (bulk_pos_ < cur_sink_.head_size) {
    const uint64_t h = std::min<uint64_t>(n, cur_sink_.head_size - bulk_pos_);
    std::memcpy(cur_sink_.head + bulk_pos_, data, h);
    data += h;
    n -= h;
    bulk_pos_ += h;
  }
  if (n > 0 && bulk_mode_ == BulkMode::kSink) {
    std::memcpy(cur_sink_.body + (bulk_pos_ - cur_sink_.head_size), data, n);
  }
  bulk_pos_ += n;  // kMismatch drops bytes past the head
}

bool ReplyReader::Complete(Reply value, Reply* out) {
  for (;;) {
    if (stack_.empty()) {
      reply_started_ = false;
      cur_has_sink_ = false;
      *out = std::move(value);
      return true;
    }
    Frame& top = stack_.back();
    top.reply.elements.push_back(std::move(value));
    if (--top.remaining > 0) return false;
    Frame done = std::move(top);
    stack_.pop_back();
    if (done.attribute) {
      // An attribute annotates the value that follows; drop it. At top level the reply is
      // still to come.
      return false;
    }
    value = std::move(done.reply);
  }
}

Result<bool> ReplyReader::ParseHeader(Reply* out, bool* emitted) {
  *emitted = false;
  const uint8_t* base = buf_.data() + begin_;
  const size_t avail = end_ - begin_;
  const void* nl = std::memchr(base, '\n', std::min(avail, limits_.max_line + 2));
  if (nl == nullptr) {
    if (avail > limits_.max_line + 1) return Violation("line longer than the limit");
    return false;
  }
  const size_t line_end = static_cast<size_t>(static_cast<const uint8_t*>(nl) - base);
  if (line_end == 0 || base[line_end - 1] != '\r') return Violation("line not ended by CRLF");
  const char type = static_cast<char>(base[0]);
  const std::string_view line(reinterpret_cast<const char*>(base) + 1, line_end - 2);
  begin_ += line_end + 1;

  const bool top = stack_.empty();
  if (top && !reply_started_ && type != '>' && type != '|') {
    // A top-level reply begins: it takes the front sink.
    reply_started_ = true;
    cur_has_sink_ = false;
    if (!sinks_.empty()) {
      cur_has_sink_ = sinks_.front().has_sink;
      cur_sink_ = sinks_.front().sink;
      sinks_.pop_front();
    }
  }

  Reply r;
  switch (type) {
    case '+':
    case '-':
    case ',':
    case '(':
      r.type = type == '+'   ? ReplyType::kSimpleString
               : type == '-' ? ReplyType::kError
               : type == ',' ? ReplyType::kDouble
                             : ReplyType::kBigNumber;
      r.str.assign(line);
      *emitted = Complete(std::move(r), out);
      return true;
    case ':':
      r.type = ReplyType::kInteger;
      if (!ParseInt(line, &r.integer)) return Violation("bad integer");
      *emitted = Complete(std::move(r), out);
      return true;
    case '#':
      if (line != "t" && line != "f") return Violation("bad boolean");
      r.type = ReplyType::kBoolean;
      r.integer = line == "t" ? 1 : 0;
      *emitted = Complete(std::move(r), out);
      return true;
    case '_':
      if (!line.empty()) return Violation("bad null");
      *emitted = Complete(std::move(r), out);
      return true;
    case '$':
    case '!':
    case '=':
    case '*':
    case '~':
    case '%':
    case '>':
    case '|': break;
    default:
      return Violation(std::string("unknown type byte 0x") + "0123456789abcdef"[(type >> 4) & 15] +
                       "0123456789abcdef"[type & 15]);
  }
  // A length: -1 is a RESP2 null ("$-1", "*-1").
  const bool bulk = type == '$' || type == '!' || type == '=';
  int64_t length = 0;
  if (!ParseInt(line, &length) || length < -1) {
    return Violation(bulk ? "bad bulk length" : "bad aggregate length");
  }
  if (length == -1) {
    *emitted = Complete(std::move(r), out);
    return true;
  }
  const uint64_t n = static_cast<uint64_t>(length);
  if (bulk) {
    bulk_ = Reply();
    bulk_.type = type == '!' ? ReplyType::kError : ReplyType::kBulkString;
    bulk_.length = n;
    bulk_pos_ = 0;
    bulk_len_ = n;
    if (top && type == '$' && cur_has_sink_) {
      const bool fits = n == cur_sink_.total();
      bulk_mode_ = fits ? BulkMode::kSink : BulkMode::kMismatch;
      bulk_.sink = fits ? SinkOutcome::kFilled : SinkOutcome::kMismatch;
    } else {
      if (n > limits_.max_bulk) return Violation("bulk string longer than the limit");
      bulk_mode_ = BulkMode::kString;
      bulk_.str.reserve(static_cast<size_t>(std::min<uint64_t>(n, 1 << 20)));
    }
    state_ = n == 0 ? State::kBulkCrlf : State::kBulkBody;
    return true;
  }
  if (n > limits_.max_elements) return Violation("aggregate larger than the limit");
  r.type = type == '*'   ? ReplyType::kArray
           : type == '~' ? ReplyType::kSet
           : type == '>' ? ReplyType::kPush
                         : ReplyType::kMap;  // '%' and '|'
  const uint64_t elements = (type == '%' || type == '|') ? 2 * n : n;
  if (elements == 0) {
    if (type == '|') return true;  // an empty attribute: nothing to drop
    *emitted = Complete(std::move(r), out);
    return true;
  }
  if (stack_.size() >= limits_.max_depth) return Violation("nesting deeper than the limit");
  r.elements.reserve(static_cast<size_t>(std::min<uint64_t>(elements, 1024)));
  stack_.push_back({std::move(r), elements, type == '|'});
  return true;
}

Result<bool> ReplyReader::Next(Reply* out) {
  for (;;) {
    switch (state_) {
      case State::kHeader: {
        if (begin_ == end_) return false;
        bool emitted = false;
        Result<bool> progressed = ParseHeader(out, &emitted);
        if (!progressed.ok()) return progressed.status();
        if (emitted) return true;
        if (!*progressed) return false;
        break;
      }
      case State::kBulkBody: {
        const size_t avail = end_ - begin_;
        if (avail == 0) return false;
        const size_t n = static_cast<size_t>(std::min<uint64_t>(avail, bulk_len_ - bulk_pos_));
        const uint8_t* p = buf_.data() + begin_;
        if (bulk_mode_ == BulkMode::kString) {
          bulk_.str.append(reinterpret_cast<const char*>(p), n);
          bulk_pos_ += n;
        } else {
          SinkWrite(p, n);
        }
        begin_ += n;
        if (bulk_pos_ == bulk_len_) state_ = State::kBulkCrlf;
        break;
      }
      case State::kBulkCrlf: {
        if (end_ - begin_ < 2) return false;
        if (buf_[begin_] != '\r' || buf_[begin_ + 1] != '\n') {
          return Violation("bulk string not ended by CRLF");
        }
        begin_ += 2;
        state_ = State::kHeader;
        bulk_mode_ = BulkMode::kString;
        if (Complete(std::move(bulk_), out)) return true;
        break;
      }
    }
  }
}

}  // namespace redis
}  // namespace lmcache_cpp
