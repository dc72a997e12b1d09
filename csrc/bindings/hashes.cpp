// SHA-256 for Python: the carriers of a scan batch hashed in one call without the
// GIL (sha256_hex_many), and the single hashes the tests compare with hashlib/hmac.
//
// Why a batch call: a scan's loader thread hashes every carrier it read (the
// carrier_sha256 of each row), about 40 % of its CPU time on small files. Given the whole
// batch, carriers of one length go through the SHA extensions four side by side
// (sha256_same_length: 63 us per 147 kB carrier, hashlib 74), and the GIL is let go once
// per batch, not once per carrier.
#include "bindings/hashes.h"

#include <Python.h>

#include <string>
#include <vector>

#include "common/macros.h"
#include "cpu/sha256.h"

namespace py = pybind11;

namespace nnmark {
namespace {

// Releases the Py_buffer views taken from Python objects, whatever happens.
struct Views {
  std::vector<Py_buffer> v;
  ~Views() {
    for (auto& b : v) PyBuffer_Release(&b);
  }
};

py::list sha256_hex_many(const py::sequence& bufs) {
  const Py_ssize_t n = py::len(bufs);
  Views views;
  views.v.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    py::object o = bufs[i];
    Py_buffer b;
    // C-contiguous bytes only: what hashlib would hash for the same object.
    if (PyObject_GetBuffer(o.ptr(), &b, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
    views.v.push_back(b);
  }
  std::vector<uint8_t> digests(static_cast<size_t>(n) * 32);  // [n, 32]
  {
    py::gil_scoped_release nogil;
    std::vector<const uint8_t*> run;
    size_t i = 0;
    while (i < static_cast<size_t>(n)) {  // runs of one length (a batch's carriers of one shape) side by side
      const Py_ssize_t len = views.v[i].len;
      run.clear();
      size_t j = i;
      for (; j < static_cast<size_t>(n) && views.v[j].len == len; ++j) run.push_back(static_cast<const uint8_t*>(views.v[j].buf));
      sha256_same_length(run.data(), run.size(), static_cast<size_t>(len), digests.data() + 32 * i);
      i = j;
    }
  }
  static const char kHex[] = "0123456789abcdef";
  py::list out(n);
  char hex[64];
  for (Py_ssize_t i = 0; i < n; ++i) {
    const uint8_t* d = digests.data() + 32 * i;
    for (int j = 0; j < 32; ++j) {
      hex[2 * j] = kHex[d[j] >> 4];
      hex[2 * j + 1] = kHex[d[j] & 15];
    }
    out[static_cast<size_t>(i)] = py::str(hex, 64);
  }
  return out;
}

}  // namespace

void bind_hashes(py::module_& m) {
  m.def("sha256_hex_many", &sha256_hex_many, py::arg("buffers"),
        "The SHA-256 of each buffer (bytes, bytearray, memoryview, C-contiguous array), as hex strings, "
        "hashed one after another without the GIL.");
  // (bytes only, checked here: pybind11's report of a mismatch would show the key)
  m.def("hmac_sha256",
        [](const py::object& key, const py::object& msg) {
          NNMARK_CHECK_ARG(PyBytes_Check(key.ptr()) && PyBytes_Check(msg.ptr()), "key and msg must be bytes");
          uint8_t out[32];
          HmacSha256(reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(key.ptr())),
                     static_cast<size_t>(PyBytes_GET_SIZE(key.ptr())))
              .mac(reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(msg.ptr())),
                   static_cast<size_t>(PyBytes_GET_SIZE(msg.ptr())), out);
          return py::bytes(reinterpret_cast<const char*>(out), 32);
        },
        py::arg("key"), py::arg("msg"), "HMAC-SHA256 (the ledger's row MAC), for tests against hmac.");
  m.def("sha256",
        [](const py::bytes& msg) {
          const std::string s = msg;
          uint8_t out[32];
          sha256(reinterpret_cast<const uint8_t*>(s.data()), s.size(), out);
          return py::bytes(reinterpret_cast<const char*>(out), 32);
        },
        py::arg("msg"), "SHA-256, for tests against hashlib.");
  m.def("sha256_native", &sha256_native, "whether SHA-256 uses the CPU's SHA extensions now");
}

}  // namespace nnmark
