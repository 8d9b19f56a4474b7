// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Real Redis servers for the googletests: redis-server processes on free loopback ports (below
// 55536 with their cluster bus ports) in a temporary directory, without persistence, stopped
// when the test ends, failed or not (and with the test process: PR_SET_PDEATHSIG). Fixtures:
// RedisStandaloneTest (one server) and RedisClusterTest (three masters made with redis-cli
// --cluster create, waited for until every node reports cluster_state:ok). Without redis-server
// on PATH the tests skip, or fail when LMCACHE_CPP_REQUIRE_REDIS=1.
#ifndef LMCACHE_CPP_TESTS_REDIS_TEST_SERVERS_H_
#define LMCACHE_CPP_TESTS_REDIS_TEST_SERVERS_H_

#include <fcntl.h>
#include <ftw.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "redis/cluster.h"
#include "redis/connection.h"

namespace lmcache_cpp {
namespace redis {
namespace testing_servers {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

inline bool OnPath(const std::string& exe) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path != nullptr ? path : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (!dir.empty() && access((dir + "/" + exe).c_str(), X_OK) == 0) return true;
  }
  return false;
}

inline bool RedisRequired() {
  const char* v = std::getenv("LMCACHE_CPP_REQUIRE_REDIS");
  return v != nullptr && std::string(v) == "1";
}

// Skips the test (or fails it, when required) unless the named programs are on PATH.
#define LMCACHE_REQUIRE_PROGRAMS(...)                                                         \
  do {                                                                                        \
    for (const char* exe : {__VA_ARGS__}) {                                                   \
      if (OnPath(exe)) continue;                                                              \
      if (RedisRequired()) {                                                                  \
        FAIL() << exe << " is not on PATH and LMCACHE_CPP_REQUIRE_REDIS=1 (Debian: apt-get "  \
               << "install redis-server redis-tools openssl)";                                \
      }                                                                                       \
      GTEST_SKIP() << exe << " is not on PATH (Debian: apt-get install redis-server "         \
                   << "redis-tools); set LMCACHE_CPP_REQUIRE_REDIS=1 to make this a failure"; \
    }                                                                                         \
  } while (0)

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/lmcache_redis_test.XXXXXX";
    const char* d = mkdtemp(tmpl);
    path_ = d != nullptr ? d : "";
  }
  ~TempDir() {
    if (path_.empty()) return;
    nftw(
        path_.c_str(),
        [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
        FTW_DEPTH | FTW_PHYS);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline bool PortFree(uint16_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  close(fd);
  return ok;
}

// A port whose cluster bus port (port + 10000) is free too; both below 55536.
inline uint16_t FreePort() {
  static std::mt19937 rng(static_cast<unsigned>(getpid()) ^
                          static_cast<unsigned>(Clock::now().time_since_epoch().count()));
  for (int i = 0; i < 500; ++i) {
    const uint16_t p = static_cast<uint16_t>(20000 + rng() % 25000);
    if (PortFree(p) && PortFree(static_cast<uint16_t>(p + 10000))) return p;
  }
  return 0;
}

// Runs a program to completion with its output in `log`. Returns its exit status (-1: not run).
inline int RunProgram(const std::vector<std::string>& argv, const std::string& log) {
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  if (pid < 0) return -1;
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline std::string Tail(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string s = ss.str();
  return s.size() > 2000 ? s.substr(s.size() - 2000) : s;
}

inline ConnectionOptions FastOptions() {
  ConnectionOptions o;
  o.connect_timeout = milliseconds(1000);
  o.op_timeout = milliseconds(5000);
  o.reconnect_backoff = milliseconds(100);
  return o;
}

// One redis-server child process.
class Server {
 public:
  Server(std::string dir, uint16_t port, std::vector<std::string> extra)
      : dir_(std::move(dir)), port_(port), extra_(std::move(extra)) {
    mkdir(dir_.c_str(), 0755);
  }
  ~Server() { Kill(); }

  uint16_t port() const { return port_; }
  Endpoint endpoint() const { return {"127.0.0.1", port_}; }
  std::string log() const { return dir_ + "/redis.log"; }

  // Starts the server and waits until it answers PING (`ready` options: how to connect).
  ::testing::AssertionResult Start(const ConnectionOptions& ready = FastOptions(),
                                   bool plain_port = true) {
    std::vector<std::string> argv = {"redis-server",
                                     "--port",
                                     plain_port ? std::to_string(port_) : "0",
                                     "--bind",
                                     "127.0.0.1",
                                     "--save",
                                     "",
                                     "--appendonly",
                                     "no",
                                     "--dir",
                                     dir_,
                                     "--logfile",
                                     log(),
                                     "--protected-mode",
                                     "no"};
    argv.insert(argv.end(), extra_.begin(), extra_.end());
    pid_ = fork();
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      const int null = open("/dev/null", O_RDWR);
      dup2(null, 1);
      dup2(null, 2);
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp("redis-server", args.data());
      _exit(127);
    }
    if (pid_ < 0) return ::testing::AssertionFailure() << "fork failed";
    // Bounded wait for the server to answer (it starts in well under a second).
    const Clock::time_point deadline = Clock::now() + std::chrono::seconds(15);
    ConnectionOptions o = ready;
    o.connect_timeout = milliseconds(500);
    o.reconnect_backoff = milliseconds(0);
    Connection c(endpoint(), o);
    Status last;
    while (Clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return ::testing::AssertionFailure()
               << "redis-server on port " << port_ << " exited at start:\n"
               << Tail(log());
      }
      Result<Reply> r = c.Command({"PING"});
      if (r.ok() && r->IsStatus("PONG")) return ::testing::AssertionSuccess();
      last = r.ok() ? Status::Internal(r->ToString()) : r.status();
      std::this_thread::sleep_for(milliseconds(20));
    }
    return ::testing::AssertionFailure() << "redis-server on port " << port_
                                         << " did not answer PING: " << last.ToString() << "\n"
                                         << Tail(log());
  }

  void Signal(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGCONT);
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  std::string dir_;
  uint16_t port_;
  std::vector<std::string> extra_;
  pid_t pid_ = -1;
};

class RedisStandaloneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    LMCACHE_REQUIRE_PROGRAMS("redis-server");
    ASSERT_FALSE(tmp_.path().empty());
    const uint16_t port = FreePort();
    ASSERT_NE(port, 0);
    server_ = std::make_unique<Server>(tmp_.path() + "/s", port, std::vector<std::string>{});
    ASSERT_TRUE(server_->Start());
  }
  void TearDown() override {
    if (server_) server_->Kill();
  }

  TempDir tmp_;
  std::unique_ptr<Server> server_;
};

class RedisClusterTest : public ::testing::Test {
 protected:
  static constexpr int kNodes = 3;

  void SetUp() override {
    LMCACHE_REQUIRE_PROGRAMS("redis-server", "redis-cli");
    ASSERT_FALSE(tmp_.path().empty());
    std::vector<std::string> create = {"redis-cli", "--cluster", "create"};
    for (int i = 0; i < kNodes; ++i) {
      const uint16_t port = FreePort();
      ASSERT_NE(port, 0);
      nodes_.push_back(std::make_unique<Server>(
          tmp_.path() + "/n" + std::to_string(i), port,
          std::vector<std::string>{"--cluster-enabled", "yes", "--cluster-config-file",
                                   "nodes.conf", "--cluster-node-timeout", "2000",
                                   "--cluster-require-full-coverage", "no"}));
      ASSERT_TRUE(nodes_.back()->Start());
      create.push_back(nodes_.back()->endpoint().ToString());
    }
    create.push_back("--cluster-yes");
    const std::string log = tmp_.path() + "/create.log";
    ASSERT_EQ(RunProgram(create, log), 0) << Tail(log);
    // Bounded wait until every node sees the whole cluster ("cluster_state:ok").
    const Clock::time_point deadline = Clock::now() + std::chrono::seconds(20);
    for (auto& n : nodes_) {
      Connection c(n->endpoint(), FastOptions());
      for (;;) {
        Result<Reply> r = c.Command({"CLUSTER", "INFO"});
        if (r.ok() && r->str.find("cluster_state:ok") != std::string::npos) break;
        ASSERT_LT(Clock::now(), deadline)
            << "cluster did not converge: " << (r.ok() ? r->str : r.status().ToString());
        std::this_thread::sleep_for(milliseconds(50));
      }
    }
  }
  void TearDown() override {
    for (auto& n : nodes_) n->Kill();
  }

  ClusterOptions Options() {
    ClusterOptions o;
    o.connection = FastOptions();
    return o;
  }
  std::string NodeId(int i) {
    Connection c(nodes_[i]->endpoint(), FastOptions());
    Result<Reply> r = c.Command({"CLUSTER", "MYID"});
    return r.ok() ? r->str : "";
  }
  int NodeOf(const Endpoint& ep) {
    for (int i = 0; i < kNodes; ++i) {
      if (nodes_[i]->endpoint() == ep) return i;
    }
    return -1;
  }

  TempDir tmp_;
  std::vector<std::unique_ptr<Server>> nodes_;
};

}  // namespace testing_servers
}  // namespace redis
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_TESTS_REDIS_TEST_SERVERS_H_
