// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The server-driven mode's CUDA primitives (cpp/cuda/ipc.h). Without a GPU: the deadline latch
// that every event wait uses, handle parsing, and that each call says CUDA is unavailable. With a
// GPU: forged handles are refused, an exported event records, and the wait on an event honours
// its deadline both ways. The cross-process flow (an engine's handles opened by the server) runs
// in tests/test_device_transfers.py's GPU part through scripts/gpu_check.sh.

#include "ipc.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "lmcache_cpp/cuda/device.h"

namespace lmcache_cpp::cuda {
namespace {

using Clock = std::chrono::steady_clock;

bool HaveGpu() { return ProbeRuntime().usable; }

bool GpuRequired() {
  const char* v = std::getenv("LMCACHE_CPP_REQUIRE_GPU");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

#define SKIP_WITHOUT_GPU()                                                                    \
  do {                                                                                        \
    if (!HaveGpu()) {                                                                         \
      if (GpuRequired()) FAIL() << "LMCACHE_CPP_REQUIRE_GPU=1 but " << ProbeRuntime().reason; \
      GTEST_SKIP() << "no CUDA device: " << ProbeRuntime().reason;                            \
    }                                                                                         \
  } while (0)

TEST(DeadlineLatchTest, OpenedBeforeTheWaitReturnsAtOnce) {
  DeadlineLatch latch;
  latch.Open();
  EXPECT_TRUE(latch.WaitUntil(Clock::now()));
  EXPECT_TRUE(latch.is_open());
}

TEST(DeadlineLatchTest, NeverOpenedTimesOutAtTheDeadline) {
  DeadlineLatch latch;
  const auto start = Clock::now();
  EXPECT_FALSE(latch.WaitUntil(start + std::chrono::milliseconds(50)));
  EXPECT_GE(Clock::now() - start, std::chrono::milliseconds(50));
  EXPECT_FALSE(latch.is_open());
}

TEST(DeadlineLatchTest, OpenedByAnotherThreadWakesTheWaiter) {
  auto latch = std::make_shared<DeadlineLatch>();
  std::promise<void> waiting;
  std::thread opener([latch, f = waiting.get_future()]() mutable {
    f.wait();
    latch->Open();
  });
  waiting.set_value();
  EXPECT_TRUE(latch->WaitUntil(Clock::now() + std::chrono::seconds(30)));
  opener.join();
}

TEST(DeadlineLatchTest, OpenedAfterTheWaiterGaveUpIsHarmless) {
  auto latch = std::make_shared<DeadlineLatch>();
  std::weak_ptr<DeadlineLatch> weak = latch;
  EXPECT_FALSE(latch->WaitUntil(Clock::now()));
  auto opener_share = latch;  // what the host function holds
  latch.reset();              // the waiter is gone
  opener_share->Open();
  EXPECT_TRUE(opener_share->is_open());
  opener_share.reset();
  EXPECT_TRUE(weak.expired());
}

TEST(IpcHandleTest, WrongSizesAreInvalid) {
  std::vector<uint8_t> bytes(kIpcHandleBytes + 1, 7);
  EXPECT_EQ(ParseIpcHandle(bytes.data(), 63).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseIpcHandle(bytes.data(), 65).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseIpcHandle(nullptr, 64).status().code(), StatusCode::kInvalidArgument);
  Result<IpcHandle> ok = ParseIpcHandle(bytes.data(), kIpcHandleBytes);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok.value()[63], 7);
  // Checked before CUDA is asked anything, so the message is the same with or without a GPU.
  EXPECT_EQ(IpcMemory::Open(bytes.data(), 65, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ImportedEvent::Open(bytes.data(), 1, 0).status().code(), StatusCode::kInvalidArgument);
}

TEST(CudaIpcTest, WithoutADeviceEveryCallIsUnavailable) {
  if (HaveGpu()) GTEST_SKIP() << "a CUDA device is present";
  std::vector<uint8_t> bytes(kIpcHandleBytes, 0);
  EXPECT_EQ(IpcMemory::Open(bytes.data(), bytes.size(), 0).status().code(),
            StatusCode::kUnavailable);
  EXPECT_EQ(ImportedEvent::Open(bytes.data(), bytes.size(), 0).status().code(),
            StatusCode::kUnavailable);
  EXPECT_EQ(ExportedEvent::Create(0).status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(OwnedStream::Create(0).status().code(), StatusCode::kUnavailable);
}

TEST(CudaIpcTest, ForgedHandlesAreRefused) {
  SKIP_WITHOUT_GPU();
  std::vector<uint8_t> bytes(kIpcHandleBytes, 0x5A);
  EXPECT_EQ(IpcMemory::Open(bytes.data(), bytes.size(), 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(ImportedEvent::Open(bytes.data(), bytes.size(), 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(IpcMemory::Open(bytes.data(), bytes.size(), 1 << 20).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(CudaIpcTest, AnExportedEventRecordsOnAnOwnedStream) {
  SKIP_WITHOUT_GPU();
  Result<std::unique_ptr<OwnedStream>> stream = OwnedStream::Create(0);
  ASSERT_TRUE(stream.ok()) << stream.status().ToString();
  Result<std::unique_ptr<ExportedEvent>> event = ExportedEvent::Create(0);
  ASSERT_TRUE(event.ok()) << event.status().ToString();
  EXPECT_TRUE(event.value()->Record(stream.value()->handle()).ok());
  std::vector<uint8_t> zero(kIpcHandleBytes, 0);
  EXPECT_NE(std::memcmp(event.value()->handle().data(), zero.data(), kIpcHandleBytes), 0);
  EXPECT_EQ(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream.value()->handle())),
            cudaSuccess);
}

}  // namespace
}  // namespace lmcache_cpp::cuda
