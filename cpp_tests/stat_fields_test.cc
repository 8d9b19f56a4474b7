// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The stats tables (stat_fields.h): every member has a row (the static_asserts in the header),
// names and metrics are unique, a metric's suffix agrees with its kind, and ForEachStat reads
// the members the rows name.

#include "lmcache_cpp/stat_fields.h"

#include <gtest/gtest.h>

#include <cstring>
#include <set>
#include <string>

namespace lmcache_cpp {
namespace {

// `metrics`: the metric names of the tables checked so far (they must not repeat across tables).
template <typename S>
void CheckTable(bool exported, std::set<std::string>* metrics) {
  std::set<std::string> names;
  std::set<const void*> members;
  S probe;
  for (const StatField<S>& f : StatTable<S>::kFields) {
    SCOPED_TRACE(f.name);
    EXPECT_TRUE(names.insert(f.name).second) << "repeated name";
    EXPECT_TRUE(members.insert(&(probe.*f.member)).second) << "repeated member";
    ASSERT_NE(f.help, nullptr);
    EXPECT_GT(std::strlen(f.help), 0u);
    EXPECT_EQ(f.metric != nullptr, exported);
    if (f.metric == nullptr) continue;
    const std::string metric = f.metric;
    EXPECT_TRUE(metrics->insert(metric).second) << "repeated metric " << metric;
    const bool total = metric.size() > 6 && metric.compare(metric.size() - 6, 6, "_total") == 0;
    EXPECT_EQ(total, f.kind == StatKind::kCounter) << metric;
  }
}

TEST(StatFieldsTest, TablesNameEachMemberOnceWithUniqueMetrics) {
  std::set<std::string> metrics;
  CheckTable<EngineStats>(true, &metrics);
  CheckTable<ClientUsage>(true, &metrics);
  CheckTable<ObjectTableStats>(true, &metrics);
  CheckTable<PrefetchStats>(true, &metrics);
  CheckTable<StoreControllerStats>(true, &metrics);
  CheckTable<L2AdapterStats>(true, &metrics);
  CheckTable<SyncAdapterStats>(false, &metrics);
  CheckTable<FsRecoveryReport>(false, &metrics);
  CheckTable<AllocatorStats>(false, &metrics);
  CheckTable<HashSessionStats>(false, &metrics);
}

TEST(StatFieldsTest, ForEachStatVisitsRowsInOrderWithTheirValues) {
  L2AdapterStats s;
  s.objects = 3;
  s.corrupt_reads = 7;
  s.bytes_read = 11;
  std::string seen;
  uint64_t sum = 0;
  ForEachStat(s, [&](const StatField<L2AdapterStats>& f, uint64_t value) {
    if (value != 0) seen += std::string(f.name) + "=" + std::to_string(value) + ";";
    sum += value;
  });
  EXPECT_EQ(seen, "objects=3;corrupt_reads=7;bytes_read=11;");
  EXPECT_EQ(sum, 21u);
}

}  // namespace
}  // namespace lmcache_cpp
