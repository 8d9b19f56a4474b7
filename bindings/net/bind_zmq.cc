// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// SocketIo: whole-message sends and receives on a pyzmq socket, through the libzmq pyzmq loaded
// (libzmq.h). Unlike pyzmq's per-frame calls they keep the GIL: every call is non-blocking and
// short, and releasing and re-taking the GIL around each frame is what makes a Python thread
// that works a socket while others submit requests wait for the GIL at every call.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cerrno>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "bind_common.h"
#include "libzmq.h"

namespace lmcache_cpp::bindings {

namespace {

using namespace nb::literals;

struct PySocketIo {
  net::Libzmq zmq;
  void* socket;
};

std::string_view View(nb::handle frame) {
  if (!nb::isinstance<nb::bytes>(frame)) throw nb::type_error("frames must be bytes");
  auto b = nb::borrow<nb::bytes>(frame);
  return {b.c_str(), b.size()};
}

}  // namespace

void BindZmq(nb::module_& m) {
  nb::class_<PySocketIo>(
      m, "SocketIo",
      "Non-blocking whole-message send and receive on a pyzmq socket (its `underlying` "
      "address), calling the libzmq pyzmq loaded without releasing the GIL. Call it only from "
      "the thread that works the socket, and only while the socket is open.")
      .def(
          "__init__",
          [](PySocketIo* self, uintptr_t socket, const std::string& libzmq_from) {
            if (socket == 0) throw nb::value_error("socket is a null address");
            std::string why;
            std::optional<net::Libzmq> zmq = net::Libzmq::Resolve(libzmq_from, &why);
            if (!zmq.has_value()) throw std::runtime_error(why);
            new (self) PySocketIo{*zmq, reinterpret_cast<void*>(socket)};
          },
          "socket"_a, nb::kw_only(), "libzmq_from"_a,
          "libzmq_from: the file of the loaded extension module whose libzmq owns the socket "
          "(pyzmq's backend). Raises RuntimeError when its libzmq functions cannot be found.")
      .def(
          "send",
          [](const PySocketIo& io, nb::tuple frames) {
            std::vector<std::string_view> views;
            views.reserve(frames.size());
            for (nb::handle f : frames) views.push_back(View(f));
            if (views.empty()) throw nb::value_error("a message has at least one frame");
            return net::SendMessage(io.zmq, io.socket, views.data(), views.size());
          },
          "frames"_a,
          "Sends the tuple of bytes as one message (copied). Returns 0, or the errno of a send "
          "that queued nothing (EAGAIN: no peer or a full queue).")
      .def(
          "recv",
          [](const PySocketIo& io, size_t max_messages) {
            nb::list messages;
            int error = 0;
            net::Message message(&io.zmq);
            while (messages.size() < max_messages) {
              if (!net::ReceiveMessage(io.zmq, io.socket, &message, &error)) break;
              nb::list frames;
              for (size_t i = 0; i < message.size(); ++i) {
                const std::string_view f = message.frame(i);
                frames.append(nb::bytes(f.data(), f.size()));
              }
              messages.append(std::move(frames));
              message.Clear();
            }
            return nb::make_tuple(messages, error == 0 || error == EAGAIN ? 0 : error);
          },
          "max_messages"_a,
          "(messages, errno): up to max_messages whole messages already queued, each a list of "
          "bytes frames, and the errno of a receive that failed other than with EAGAIN (0: "
          "none).");
}

}  // namespace lmcache_cpp::bindings
