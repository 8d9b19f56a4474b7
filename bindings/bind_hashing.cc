// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bindings of object_key.h, bitmap.h, chunk_hash.h and hash_session.h.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "lmcache_cpp/bitmap.h"
#include "lmcache_cpp/chunk_hash.h"
#include "lmcache_cpp/hash_session.h"
#include "lmcache_cpp/object_key.h"

namespace lmcache_cpp::bindings {
namespace {

using namespace nb::literals;

constexpr size_t kReprHexChars = 16;

nb::bytes HashBytes(const ChunkHash& h) { return nb::bytes(h.bytes.data(), h.bytes.size()); }

ChunkHash HashFromBytes(const nb::bytes& data) {
  return ValueOrThrow(ChunkHash::FromBytes(data.data(), data.size()));
}

// "<64 hex>@<rank>".
std::string KeyHex(const ObjectKey& k) { return k.chunk.ToHex() + "@" + std::to_string(k.kv_rank); }

ObjectKey KeyFromHex(const std::string& text) {
  const size_t at = text.rfind('@');
  if (at == std::string::npos) {
    throw StatusError(Status::InvalidArgument("object key '" + text + "' lacks '@<kv_rank>'"));
  }
  ObjectKey key;
  key.chunk = ValueOrThrow(ChunkHash::FromHex(text.substr(0, at)));
  const std::string rank = text.substr(at + 1);
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(rank, &used, 10);
  } catch (const std::exception&) {
    used = 0;
  }
  if (rank.empty() || used != rank.size() || value < INT32_MIN || value > INT32_MAX) {
    throw StatusError(Status::InvalidArgument("object key '" + text + "': bad kv_rank"));
  }
  key.kv_rank = static_cast<int32_t>(value);
  return key;
}

// Python's repr() of a str.
std::string PyRepr(const std::string& s) { return nb::repr(nb::str(s.data(), s.size())).c_str(); }

std::vector<bool> BitList(const Bitmap& b) {
  std::vector<bool> out(b.size());
  for (size_t i = 0; i < b.size(); ++i) out[i] = b.Test(i);
  return out;
}

// Python index (negative counts from the end) -> bit index, or IndexError.
size_t BitIndex(const Bitmap& b, int64_t i) {
  const auto n = static_cast<int64_t>(b.size());
  if (i < 0) i += n;
  if (i < 0 || i >= n) throw nb::index_error("Bitmap index out of range");
  return static_cast<size_t>(i);
}

void BindKeys(nb::module_& m) {
  m.attr("CHUNK_HASH_SIZE") = kChunkHashSize;
  m.attr("MAX_BLOCK_HASH_SIZE") = kMaxBlockHashSize;

  nb::class_<ChunkHash>(m, "ChunkHash",
                        "The 32-byte rolling prefix hash of one full chunk of tokens. Immutable.")
      .def(
          "__init__",
          [](ChunkHash* self, const nb::bytes& data) { new (self) ChunkHash(HashFromBytes(data)); },
          "data"_a, "From exactly 32 bytes (InvalidArgumentError otherwise).")
      .def_static(
          "from_hex", [](const std::string& hex) { return ValueOrThrow(ChunkHash::FromHex(hex)); },
          "hex"_a, "From 64 hex characters (InvalidArgumentError otherwise).")
      .def("hex", &ChunkHash::ToHex, "Lower-case hex, 64 characters.")
      .def_prop_ro("bytes", &HashBytes, "The 32 raw bytes.")
      .def("__bytes__", &HashBytes)
      .def(ValueOps<ChunkHashHash, true>())
      .def("__repr__",
           [](const ChunkHash& h) {
             return "ChunkHash(" + h.ToHex().substr(0, kReprHexChars) + "...)";
           })
      .def("__getstate__", &HashBytes)
      .def("__setstate__", [](ChunkHash& self, const nb::bytes& state) {
        new (&self) ChunkHash(HashFromBytes(state));
      });

  nb::class_<ObjectKey>(m, "ObjectKey",
                        "(chunk hash, kv_rank): the identity of one stored object. Immutable.")
      .def(
          "__init__",
          [](ObjectKey* self, const ChunkHash& chunk, int32_t kv_rank) {
            new (self) ObjectKey{chunk, kv_rank};
          },
          "chunk"_a, "kv_rank"_a = 0)
      .def_prop_ro("chunk", [](const ObjectKey& k) { return k.chunk; })
      .def_prop_ro("kv_rank", [](const ObjectKey& k) { return k.kv_rank; })
      .def("hex", &KeyHex, "'<64 hex chars>@<kv_rank>'.")
      .def_static("from_hex", &KeyFromHex, "text"_a, "Parses the form hex() writes.")
      .def("short", &ObjectKey::ToShortString, "'<16 hex chars>@<kv_rank>', for logs.")
      .def(ValueOps<ObjectKeyHash, true>())
      .def("__repr__", [](const ObjectKey& k) { return "ObjectKey(" + k.ToShortString() + ")"; })
      .def("__getstate__",
           [](const ObjectKey& k) { return std::make_tuple(HashBytes(k.chunk), k.kv_rank); })
      .def("__setstate__", [](ObjectKey& self, const std::tuple<nb::bytes, int32_t>& state) {
        new (&self) ObjectKey{HashFromBytes(std::get<0>(state)), std::get<1>(state)};
      });

  m.def(
      "expand_to_all_ranks",
      [](const std::vector<ChunkHash>& chunks, int32_t world_size) {
        return ValueOrThrow(ExpandToAllRanks(chunks, world_size));
      },
      "chunks"_a, "world_size"_a, "Object keys of every rank in [0, world_size), chunk-major.");
  m.def("keys_for_rank", &KeysForRank, "chunks"_a, "kv_rank"_a,
        "Object keys of one rank: [c0@rank, c1@rank, ...].");

  nb::class_<Bitmap> bitmap(m, "Bitmap", "A fixed-length bit set with prefix operations.");
  bitmap.def(nb::init<size_t, bool>(), "size"_a = 0, "value"_a = false)
      .def_static(
          "from_list",
          [](const std::vector<bool>& bits) {
            Bitmap b(bits.size());
            for (size_t i = 0; i < bits.size(); ++i) b.Assign(i, bits[i]);
            return b;
          },
          "bits"_a)
      .def("__len__", &Bitmap::size)
      .def("__getitem__", [](const Bitmap& b, int64_t i) { return b.Test(BitIndex(b, i)); })
      .def("__setitem__", [](Bitmap& b, int64_t i, bool v) { b.Assign(BitIndex(b, i), v); })
      .def("popcount", &Bitmap::Popcount, "Number of set bits.")
      .def("leading_ones", &Bitmap::LeadingOnes, "Length of the run of set bits from bit 0.")
      .def(
          "find_next_set",
          [](const Bitmap& b, size_t start) {
            return start >= b.size() ? b.size() : b.FindNextSet(start);
          },
          "start"_a, "Index of the first set bit at or after `start`, or len(self).")
      .def("all", &Bitmap::All)
      .def("any", &Bitmap::Any)
      .def("none", &Bitmap::None)
      .def(
          "__and__", [](const Bitmap& a, const Bitmap& b) { return a & b; }, nb::is_operator())
      .def(
          "__or__", [](const Bitmap& a, const Bitmap& b) { return a | b; }, nb::is_operator())
      .def("__invert__", [](const Bitmap& a) { return ~a; })
      .def(
          "__eq__", [](const Bitmap& a, const Bitmap& b) { return a == b; }, nb::is_operator())
      .def(
          "__ne__", [](const Bitmap& a, const Bitmap& b) { return a != b; }, nb::is_operator())
      .def("to_list", &BitList)
      .def("__iter__", [](const Bitmap& b) { return nb::iter(nb::cast(BitList(b))); })
      .def("__str__", &Bitmap::ToString)
      .def("__repr__", [](const Bitmap& b) { return "Bitmap('" + b.ToString() + "')"; });
  bitmap.attr("__hash__") = nb::none();  // mutable
}

void BindHashing(nb::module_& m) {
  nb::enum_<HashAlgorithm>(m, "HashAlgorithm")
      .value("SHA256", HashAlgorithm::kSha256)
      .value("XXH3", HashAlgorithm::kXxh3);

  nb::class_<NamespaceConfig>(m, "NamespaceConfig",
                              "What separates caches: model, object byte layout, optional salt.")
      .def(
          "__init__",
          [](NamespaceConfig* self, std::string model_name, std::string layout_fingerprint,
             std::string cache_salt) {
            new (self) NamespaceConfig{std::move(model_name), std::move(layout_fingerprint),
                                       std::move(cache_salt)};
          },
          "model_name"_a = "", "layout_fingerprint"_a = "", "cache_salt"_a = "")
      .def_rw("model_name", &NamespaceConfig::model_name)
      .def_rw("layout_fingerprint", &NamespaceConfig::layout_fingerprint)
      .def_rw("cache_salt", &NamespaceConfig::cache_salt)
      .def("__repr__", [](const NamespaceConfig& ns) {
        return "NamespaceConfig(model_name=" + PyRepr(ns.model_name) +
               ", layout_fingerprint=" + PyRepr(ns.layout_fingerprint) +
               ", cache_salt=" + PyRepr(ns.cache_salt) + ")";
      });

  nb::class_<ChunkHasher>(m, "ChunkHasher",
                          "Rolling prefix hash of token chunks (see chunk_hash.h). Immutable; "
                          "safe to share between threads.")
      .def(
          "__init__",
          [](ChunkHasher* self, const NamespaceConfig& ns, size_t chunk_size,
             HashAlgorithm algorithm) {
            new (self) ChunkHasher(ValueOrThrow(ChunkHasher::Create(ns, chunk_size, algorithm)));
          },
          "namespace"_a, "chunk_size"_a, "algorithm"_a = HashAlgorithm::kSha256)
      .def_prop_ro("chunk_size", &ChunkHasher::chunk_size)
      .def_prop_ro("algorithm", &ChunkHasher::algorithm)
      .def_prop_ro("seed", [](const ChunkHasher& h) { return h.seed(); })
      .def(
          "hash_tokens",
          [](const ChunkHasher& h, nb::handle tokens) {
            TokenBuffer buf(tokens);
            std::vector<ChunkHash> out;
            {
              nb::gil_scoped_release release;
              out = h.HashTokens(buf.data(), buf.size());
            }
            return out;
          },
          "tokens"_a, "Hashes of the full chunks of `tokens` (trailing partial chunk ignored).")
      .def(
          "hash_blocks",
          [](const ChunkHasher& h, const nb::bytes& block_hashes, size_t block_hash_size,
             size_t block_size) {
            const size_t total = block_hashes.size();
            if (block_hash_size != 0 && total % block_hash_size != 0) {
              throw StatusError(Status::InvalidArgument(
                  "block_hashes holds " + std::to_string(total) +
                  " bytes, not a multiple of block_hash_size " + std::to_string(block_hash_size)));
            }
            const size_t num_blocks = block_hash_size == 0 ? 0 : total / block_hash_size;
            const auto* data = static_cast<const uint8_t*>(block_hashes.data());
            Result<std::vector<ChunkHash>> out = [&] {
              nb::gil_scoped_release release;
              return h.HashFromBlockHashes(data, num_blocks, block_hash_size, block_size);
            }();
            return ValueOrThrow(std::move(out));
          },
          "block_hashes"_a, "block_hash_size"_a, "block_size"_a,
          "Hash mode: one hash per full chunk from the engine's concatenated block hashes.")
      .def_static(
          "raw_digest",
          [](HashAlgorithm algorithm, const nb::bytes& data) {
            const void* p = data.data();
            const size_t n = data.size();
            nb::gil_scoped_release release;
            return ChunkHasher::RawDigest(algorithm, p, n);
          },
          "algorithm"_a, "data"_a, "One plain digest of `data` (tests, benchmarks).");

  BindStats<HashSessionStats>(m, "HashSessionStats", "Counters of a HashSessionCache.");

  const HashSessionOptions defaults;
  nb::class_<HashSessionCache>(m, "HashSessionCache",
                               "Per-request memo of chunk hashes; a growing request is hashed "
                               "once and extended. Thread-safe.")
      .def(
          "__init__",
          [](HashSessionCache* self, const ChunkHasher& hasher, double ttl_s, size_t max_sessions,
             const PyManualClock* clock) {
            HashSessionOptions options;
            options.ttl = SecondsToDuration(ttl_s, "ttl_s");
            options.max_sessions = max_sessions;
            new (self)
                HashSessionCache(&hasher, options, clock != nullptr ? clock->clock : nullptr);
          },
          "hasher"_a, nb::kw_only(), "ttl_s"_a = DurationToSeconds(defaults.ttl),
          "max_sessions"_a = defaults.max_sessions, "clock"_a.none() = nb::none(),
          nb::keep_alive<1, 2>())
      .def(
          "hash_tokens",
          [](HashSessionCache& c, uint64_t request_id, nb::handle tokens) {
            TokenBuffer buf(tokens);
            std::vector<ChunkHash> out;
            {
              nb::gil_scoped_release release;
              out = c.HashTokens(request_id, buf.data(), buf.size());
            }
            return out;
          },
          "request_id"_a, "tokens"_a)
      .def("end_session", &HashSessionCache::EndSession, "request_id"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("reap", &HashSessionCache::Reap, nb::call_guard<nb::gil_scoped_release>())
      .def("__len__", &HashSessionCache::size, nb::call_guard<nb::gil_scoped_release>())
      .def("stats", &HashSessionCache::stats, nb::call_guard<nb::gil_scoped_release>());
}

}  // namespace

void BindKeysAndHashing(nb::module_& m) {
  BindKeys(m);
  BindHashing(m);
}

}  // namespace lmcache_cpp::bindings
