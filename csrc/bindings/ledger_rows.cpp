// ledger_rows: the values and MACs of a batch of ledger rows, for Ledger.write
// (python/nnmark/ledger.py holds the reference: _normalize, _canonical, _Signer).
//
// Per row, in one pass with the GIL held: the values in field order as SQLite stores
// them, and the canonical bytes the MAC covers. Then, without the GIL (loader threads
// run meanwhile), the HMAC-SHA256 of every canonical encoding. Only plain values are
// handled here (None; int within 64 bits or bool in an INTEGER column; float in a REAL
// one; str in a TEXT one) in a plain dict: any other row goes to `slow`, the Python
// path, whole, so that both give the same rows and MACs.
#include "bindings/ledger_rows.h"

#include <Python.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/macros.h"
#include "cpu/sha256.h"

namespace py = pybind11;

namespace nnmark {
namespace {

const char kHex[] = "0123456789abcdef";

// ASCII characters JSON writes as they are (json's encode_basestring_ascii).
const struct Plain {
  bool c[128] = {};
  Plain() {
    for (int i = ' '; i <= '~'; ++i) c[i] = i != '"' && i != '\\';
  }
} kPlain;

// The canonical bytes of every row of a batch, one after the other. Each row asks for
// room for its longest possible encoding first, then writes through a plain pointer.
class Out {
 public:
  char* room(size_t k) {
    if (used_ + k > s_.size()) s_.resize(std::max(2 * s_.size(), used_ + k));
    return &s_[used_];
  }
  void done(const char* end) { used_ = static_cast<size_t>(end - s_.data()); }
  size_t size() const { return used_; }
  const uint8_t* data() const { return reinterpret_cast<const uint8_t*>(s_.data()); }

 private:
  std::string s_;
  size_t used_ = 0;
};

char* put_u4(char* p, Py_UCS4 c) {
  *p++ = '\\', *p++ = 'u';
  for (int shift = 12; shift >= 0; shift -= 4) *p++ = kHex[(c >> shift) & 0xf];
  return p;
}

char* put_escape(char* p, Py_UCS4 c) {
  switch (c) {
    case '\\': *p++ = '\\', *p++ = '\\'; return p;
    case '"': *p++ = '\\', *p++ = '"'; return p;
    case '\b': *p++ = '\\', *p++ = 'b'; return p;
    case '\f': *p++ = '\\', *p++ = 'f'; return p;
    case '\n': *p++ = '\\', *p++ = 'n'; return p;
    case '\r': *p++ = '\\', *p++ = 'r'; return p;
    case '\t': *p++ = '\\', *p++ = 't'; return p;
    default: break;
  }
  if (c >= 0x10000) {  // a surrogate pair
    const Py_UCS4 v = c - 0x10000;
    p = put_u4(p, 0xd800 | (v >> 10));
    c = 0xdc00 | (v & 0x3ff);
  }
  return put_u4(p, c);
}

// json.dumps(s, ensure_ascii=True) of a str: at most 2 + 12 * len(s) bytes.
char* put_json_str(char* p, PyObject* s) {
  const Py_ssize_t n = PyUnicode_GET_LENGTH(s);
  *p++ = '"';
  if (PyUnicode_IS_ASCII(s)) {
    const Py_UCS1* d = PyUnicode_1BYTE_DATA(s);
    for (Py_ssize_t i = 0; i < n; ++i) {
      const Py_UCS1 c = d[i];
      if (kPlain.c[c]) {
        *p++ = static_cast<char>(c);
      } else {
        p = put_escape(p, c);
      }
    }
  } else {
    const int kind = PyUnicode_KIND(s);
    const void* d = PyUnicode_DATA(s);
    for (Py_ssize_t i = 0; i < n; ++i) {
      const Py_UCS4 c = PyUnicode_READ(kind, d, i);
      if (c < 128 && kPlain.c[c]) {
        *p++ = static_cast<char>(c);
      } else {
        p = put_escape(p, c);
      }
    }
  }
  *p++ = '"';
  return p;
}

// A REAL value: its IEEE 754 bytes, little-endian on any host, in hex (16 digits); None
// as the quiet NaN.
char* put_real_hex(char* p, PyObject* x) {
  uint64_t bits = 0x7ff8000000000000ULL;
  if (x != Py_None) {
    const double d = PyFloat_AS_DOUBLE(x);
    std::memcpy(&bits, &d, sizeof bits);
  }
  for (int i = 0; i < 8; ++i) {
    const unsigned b = (bits >> (8 * i)) & 0xff;
    *p++ = kHex[b >> 4], *p++ = kHex[b & 0xf];
  }
  return p;
}

// Normalises r[field] for column kind k ('i' INTEGER, 'r' REAL, 't' TEXT) into a new
// reference (an INTEGER's value also in *i); nullptr when the value needs the Python
// path (no error set).
PyObject* plain_value(PyObject* x, char k, long long* i) {
  if (x == Py_None) return Py_NewRef(Py_None);
  if (k == 'i') {
    if (PyBool_Check(x)) return PyLong_FromLong(*i = (x == Py_True));
    if (!PyLong_CheckExact(x)) return nullptr;
    int overflow = 0;
    *i = PyLong_AsLongLongAndOverflow(x, &overflow);
    return overflow ? nullptr : Py_NewRef(x);
  }
  if (k == 'r') {
    if (!PyFloat_CheckExact(x)) return nullptr;
    const double d = PyFloat_AS_DOUBLE(x);
    if (!std::isfinite(d)) return Py_NewRef(Py_None);  // SQLite has no NaN: NULL
    if (d == 0.0 && std::signbit(d)) return PyFloat_FromDouble(0.0);  // SQLite returns -0.0 as 0.0
    return Py_NewRef(x);
  }
  return PyUnicode_CheckExact(x) ? Py_NewRef(x) : nullptr;
}

struct Job {
  PyObject* row;    // borrowed from rows
  PyObject* values; // borrowed from the result
  size_t signer, offset, size;
};

// Every argument comes as an object and is checked here: a mismatch that pybind11 reports
// would show the arguments' values, and `keys` holds secrets.
py::list ledger_rows(const py::object& rows, const py::object& fields, const py::object& kinds_obj,
                     const py::object& order_obj, const py::object& kid_obj, const py::object& mac_obj,
                     const py::object& keys, const py::object& slow) {
  NNMARK_CHECK_ARG(PyList_CheckExact(rows.ptr()), "rows must be a list");
  NNMARK_CHECK_ARG(PyTuple_CheckExact(fields.ptr()), "fields must be a tuple");
  NNMARK_CHECK_ARG(PyUnicode_CheckExact(kinds_obj.ptr()) && PyUnicode_IS_ASCII(kinds_obj.ptr()),
                   "kinds must be an ASCII str");
  NNMARK_CHECK_ARG(PyList_CheckExact(order_obj.ptr()) || PyTuple_CheckExact(order_obj.ptr()),
                   "order must be a list or tuple of ints");
  NNMARK_CHECK_ARG(PyLong_CheckExact(kid_obj.ptr()) && PyLong_CheckExact(mac_obj.ptr()),
                   "kid_at and mac_at must be ints");
  NNMARK_CHECK_ARG(PyDict_CheckExact(keys.ptr()), "keys must be a dict");
  NNMARK_CHECK_ARG(PyCallable_Check(slow.ptr()), "slow must be callable");
  const std::string kinds(reinterpret_cast<const char*>(PyUnicode_1BYTE_DATA(kinds_obj.ptr())),
                          static_cast<size_t>(PyUnicode_GET_LENGTH(kinds_obj.ptr())));
  const Py_ssize_t n = static_cast<Py_ssize_t>(kinds.size());
  const long kid_at = PyLong_AsLong(kid_obj.ptr()), mac_at = PyLong_AsLong(mac_obj.ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  NNMARK_CHECK_ARG(PyTuple_GET_SIZE(fields.ptr()) == n, "fields and kinds differ in length");
  NNMARK_CHECK_ARG(kid_at >= 0 && kid_at < n && mac_at >= 0 && mac_at < n, "kid_at or mac_at out of range");
  for (const char k : kinds) NNMARK_CHECK_ARG(k == 'i' || k == 'r' || k == 't', "unknown column kind ", k);
  for (Py_ssize_t i = 0; i < n; ++i)
    NNMARK_CHECK_ARG(PyUnicode_CheckExact(PyTuple_GET_ITEM(fields.ptr(), i)), "field names must be str");
  std::vector<int> order;
  for (const py::handle item : order_obj) {
    NNMARK_CHECK_ARG(PyLong_CheckExact(item.ptr()), "order must be a list or tuple of ints");
    const long i = PyLong_AsLong(item.ptr());
    if (PyErr_Occurred()) throw py::error_already_set();
    NNMARK_CHECK_ARG(i >= 0 && i < n && i != mac_at, "bad signed field index ", i);
    order.push_back(static_cast<int>(i));
  }

  const Py_ssize_t count = PyList_GET_SIZE(rows.ptr());
  py::list out(count);
  std::vector<std::pair<PyObject*, HmacSha256>> signers;  // (MAC key bytes, its HMAC)
  std::vector<Job> jobs;
  Out buf;
  std::vector<long long> ints(static_cast<size_t>(n));

  for (Py_ssize_t j = 0; j < count; ++j) {
    PyObject* row = PyList_GET_ITEM(rows.ptr(), j);
    PyObject* v = PyDict_CheckExact(row) ? PyList_New(n) : nullptr;
    if (v != nullptr) {
      for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* x = PyDict_GetItemWithError(row, PyTuple_GET_ITEM(fields.ptr(), i));
        if (x == nullptr) {
          if (PyErr_Occurred()) {
            Py_DECREF(v);
            throw py::error_already_set();
          }
          x = Py_None;
        }
        PyObject* y = plain_value(x, kinds[i], &ints[i]);
        if (y == nullptr) {
          Py_CLEAR(v);
          break;
        }
        PyList_SET_ITEM(v, i, y);
      }
    } else if (PyErr_Occurred()) {
      throw py::error_already_set();
    }
    if (v == nullptr) {  // the Python path: normalises and signs the row itself
      py::object got = slow(py::handle(row));
      NNMARK_CHECK_RT(PyList_CheckExact(got.ptr()) && PyList_GET_SIZE(got.ptr()) == n,
                      "the slow path must return a list of the row's values");
      PyList_SET_ITEM(out.ptr(), j, got.release().ptr());
      continue;
    }
    PyList_SET_ITEM(out.ptr(), j, v);

    PyObject* kid = PyList_GET_ITEM(v, kid_at);
    if (kid == Py_None) continue;
    PyObject* key = PyDict_GetItemWithError(keys.ptr(), kid);
    if (key == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      continue;  // not a key of this write: the row keeps its mac
    }
    size_t s = 0;
    while (s < signers.size() && signers[s].first != key) ++s;
    if (s == signers.size()) {
      NNMARK_CHECK_ARG(PyBytes_Check(key), "a MAC key must be bytes");
      signers.emplace_back(key, HmacSha256(reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(key)),
                                           static_cast<size_t>(PyBytes_GET_SIZE(key))));
    }
    // The canonical bytes: the INTEGER and TEXT values as a JSON array, then the REAL ones in hex.
    size_t most = 2;
    for (const int i : order) {
      PyObject* x = PyList_GET_ITEM(v, i);
      most += kinds[i] == 't' && x != Py_None ? 3 + 12 * static_cast<size_t>(PyUnicode_GET_LENGTH(x)) : 21;
    }
    const size_t start = buf.size();
    char* p = buf.room(most);
    *p++ = '[';
    bool first = true;
    for (const int i : order) {
      if (kinds[i] == 'r') continue;
      if (!first) *p++ = ',';
      first = false;
      PyObject* x = PyList_GET_ITEM(v, i);
      if (x == Py_None) {
        std::memcpy(p, "null", 4);
        p += 4;
      } else if (kinds[i] == 'i') {
        p = std::to_chars(p, p + 20, ints[i]).ptr;
      } else {
        p = put_json_str(p, x);
      }
    }
    *p++ = ']';
    for (const int i : order)
      if (kinds[i] == 'r') p = put_real_hex(p, PyList_GET_ITEM(v, i));
    buf.done(p);
    jobs.push_back({row, v, s, start, buf.size() - start});
  }

  std::vector<char> hex(jobs.size() * 64);
  {
    py::gil_scoped_release release;
    uint8_t digest[32];
    for (size_t t = 0; t < jobs.size(); ++t) {
      signers[jobs[t].signer].second.mac(buf.data() + jobs[t].offset,
                                         jobs[t].size, digest);
      for (int b = 0; b < 32; ++b) {
        hex[64 * t + 2 * b] = kHex[digest[b] >> 4];
        hex[64 * t + 2 * b + 1] = kHex[digest[b] & 0xf];
      }
    }
  }
  PyObject* mac_name = PyTuple_GET_ITEM(fields.ptr(), mac_at);
  for (size_t t = 0; t < jobs.size(); ++t) {
    PyObject* m = PyUnicode_New(64, 127);
    if (m == nullptr) throw py::error_already_set();
    std::memcpy(PyUnicode_1BYTE_DATA(m), hex.data() + 64 * t, 64);
    PyList_SetItem(jobs[t].values, mac_at, m);  // steals m
    if (PyDict_SetItem(jobs[t].row, mac_name, m) < 0) throw py::error_already_set();
  }
  return out;
}

}  // namespace

void bind_ledger_rows(py::module_& m) {
  m.def("ledger_rows", &ledger_rows, py::arg("rows"), py::arg("fields"), py::arg("kinds"), py::arg("order"),
        py::arg("kid_at"), py::arg("mac_at"), py::arg("keys"), py::arg("slow"),
        "The values (in field order, as SQLite stores them) of each row of a ledger batch, the rows of the "
        "keys in `keys` ({key_id: MAC key}) with their HMAC-SHA256 `mac` (set in the row too); rows it does "
        "not handle go to slow(row). See nnmark.ledger.");
}

}  // namespace nnmark
