// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/status.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <set>
#include <string>

namespace lmcache_cpp {
namespace {

TEST(StatusTest, DefaultIsOkWithEmptyMessage) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.message(), "");
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_EQ(s, Status::Ok());
}

TEST(StatusTest, ErrorCarriesCodeAndMessage) {
  Status s = Status::KeyAbsent("no such chunk");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kKeyAbsent);
  EXPECT_EQ(s.message(), "no such chunk");
  EXPECT_EQ(s.ToString(), "KeyAbsent: no such chunk");
}

TEST(StatusTest, ErrorWithoutMessagePrintsOnlyTheCodeName) {
  EXPECT_EQ(Status::Timeout("").ToString(), "Timeout");
}

TEST(StatusTest, OkCodeWithMessageIsPlainOk) {
  Status s(StatusCode::kOk, "ignored");
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.message(), "");
}

TEST(StatusTest, EqualityComparesCodeAndMessage) {
  EXPECT_EQ(Status::NotFound("x"), Status::NotFound("x"));
  EXPECT_NE(Status::NotFound("x"), Status::NotFound("y"));
  EXPECT_NE(Status::NotFound("x"), Status::AlreadyExists("x"));
  EXPECT_NE(Status::NotFound("x"), Status::Ok());
}

TEST(StatusTest, CopiesShareTheSameError) {
  Status a = Status::Internal("broken invariant");
  Status b = a;
  EXPECT_EQ(a, b);
  EXPECT_EQ(&a.message(), &b.message());  // shared immutable state, no copy of the string
}

TEST(StatusTest, FactoriesProduceTheirCodes) {
  EXPECT_EQ(Status::InvalidArgument("").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Status::NotReadable("").code(), StatusCode::kNotReadable);
  EXPECT_EQ(Status::NotWritable("").code(), StatusCode::kNotWritable);
  EXPECT_EQ(Status::WrongState("").code(), StatusCode::kWrongState);
  EXPECT_EQ(Status::Locked("").code(), StatusCode::kLocked);
  EXPECT_EQ(Status::OutOfMemory("").code(), StatusCode::kOutOfMemory);
  EXPECT_EQ(Status::LeaseNotHeld("").code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(Status::ResourceExhausted("").code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(Status::Cancelled("").code(), StatusCode::kCancelled);
  EXPECT_EQ(Status::IoError("").code(), StatusCode::kIoError);
  EXPECT_EQ(Status::Corruption("").code(), StatusCode::kCorruption);
  EXPECT_EQ(Status::PermissionDenied("").code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(Status::Unavailable("").code(), StatusCode::kUnavailable);
  EXPECT_EQ(Status::NotSupported("").code(), StatusCode::kNotSupported);
}

TEST(StatusTest, CodeValuesAreStableOnTheWire) {
  EXPECT_EQ(static_cast<int32_t>(StatusCode::kOk), 0);
  EXPECT_EQ(static_cast<int32_t>(StatusCode::kInvalidArgument), 1);
  EXPECT_EQ(static_cast<int32_t>(StatusCode::kKeyAbsent), 2);
  EXPECT_EQ(static_cast<int32_t>(StatusCode::kNotFound), 9);
  EXPECT_EQ(static_cast<int32_t>(StatusCode::kNotSupported), 18);
  EXPECT_EQ(static_cast<int32_t>(StatusCode::kInternal), 19);
}

TEST(StatusTest, EveryCodeHasADistinctName) {
  std::set<std::string> names;
  for (int32_t c = 0; c <= static_cast<int32_t>(StatusCode::kInternal); ++c) {
    const std::string name = StatusCodeName(static_cast<StatusCode>(c));
    EXPECT_NE(name, "Unknown") << "code " << c;
    names.insert(name);
  }
  EXPECT_EQ(names.size(), static_cast<size_t>(StatusCode::kInternal) + 1);
  EXPECT_STREQ(StatusCodeName(StatusCode::kOk), "OK");
  EXPECT_STREQ(StatusCodeName(StatusCode::kNotReadable), "NotReadable");
}

TEST(StatusTest, FromErrnoIsAnIoErrorEndingWithStrerror) {
  Status s = Status::FromErrno(ENOENT, "open /nonexistent");
  EXPECT_EQ(s.code(), StatusCode::kIoError);
  const std::string expected = std::string("open /nonexistent: ") + std::strerror(ENOENT);
  EXPECT_EQ(s.message(), expected);
}

TEST(ResultTest, HoldsAValue) {
  Result<int> r = 42;
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r.status().ok());
  EXPECT_EQ(r.value(), 42);
  EXPECT_EQ(*r, 42);
}

TEST(ResultTest, HoldsAnError) {
  Result<int> r = Status::NotFound("session 7");
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status(), Status::NotFound("session 7"));
}

TEST(ResultTest, ConstructedFromOkStatusBecomesInternalError) {
  Result<int> r = Status::Ok();
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
}

TEST(ResultTest, ArrowAndMoveReachTheValue) {
  Result<std::string> r = std::string("payload");
  EXPECT_EQ(r->size(), 7u);
  std::string moved = std::move(r).value();
  EXPECT_EQ(moved, "payload");
}

TEST(ResultTest, HoldsMoveOnlyValues) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(5);
  ASSERT_TRUE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 5);
}

Status FailIf(bool fail) { return fail ? Status::Locked("leased") : Status::Ok(); }

Status TwoSteps(bool fail_first, bool fail_second, int* steps) {
  LMCACHE_RETURN_IF_ERROR(FailIf(fail_first));
  ++*steps;
  LMCACHE_RETURN_IF_ERROR(FailIf(fail_second));
  ++*steps;
  return Status::Ok();
}

TEST(StatusMacroTest, ReturnIfErrorStopsAtTheFirstError) {
  int steps = 0;
  EXPECT_TRUE(TwoSteps(false, false, &steps).ok());
  EXPECT_EQ(steps, 2);
  steps = 0;
  EXPECT_EQ(TwoSteps(false, true, &steps).code(), StatusCode::kLocked);
  EXPECT_EQ(steps, 1);
  steps = 0;
  EXPECT_EQ(TwoSteps(true, false, &steps).code(), StatusCode::kLocked);
  EXPECT_EQ(steps, 0);
}

Result<int> ParsePositive(int v) {
  if (v <= 0) return Status::InvalidArgument("not positive");
  return v;
}

Result<int> SumOfTwo(int a, int b) {
  LMCACHE_ASSIGN_OR_RETURN(int x, ParsePositive(a));
  LMCACHE_ASSIGN_OR_RETURN(int y, ParsePositive(b));  // second use on another line
  return x + y;
}

TEST(StatusMacroTest, AssignOrReturnAssignsOrPropagates) {
  Result<int> ok = SumOfTwo(2, 3);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, 5);
  Result<int> bad = SumOfTwo(2, -1);
  EXPECT_EQ(bad.status(), Status::InvalidArgument("not positive"));
}

Result<std::unique_ptr<int>> MakeBox(bool fail) {
  if (fail) return Status::OutOfMemory("no room");
  return std::make_unique<int>(9);
}

Status UseBox(bool fail, int* out) {
  std::unique_ptr<int> box;
  LMCACHE_ASSIGN_OR_RETURN(box, MakeBox(fail));  // assigns to an existing variable
  *out = *box;
  return Status::Ok();
}

TEST(StatusMacroTest, AssignOrReturnMovesMoveOnlyValues) {
  int out = 0;
  EXPECT_TRUE(UseBox(false, &out).ok());
  EXPECT_EQ(out, 9);
  EXPECT_EQ(UseBox(true, &out).code(), StatusCode::kOutOfMemory);
}

}  // namespace
}  // namespace lmcache_cpp
