// serving_check: load a SavedModel exactly the way TensorFlow Serving does
// (tensorflow::LoadSavedModel with the "serve" tag, then Session::Run on a
// SignatureDef's tensor names) and run one signature on .npy inputs.
//
// Usage:
//   serving_check --model DIR [--signature KEY] [--input NAME=FILE.npy ...]
//                 [--shape NAME=D0,D1,...] [--batch N] [--seed S]
//                 --output_dir OUT
//
// Outputs are written as OUT/<output key>.npy, generated inputs as
// OUT/input_<input key>.npy.  One line per output is printed to stdout:
//   <key> <dtype> [d0,d1,...]
// On any error a single line "serving_check: error: ..." goes to stderr and
// the exit status is 1.
//
// Build with tools/serving_check/build.py (uses tf.sysconfig flags).

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/base/log_severity.h"
#include "absl/log/globals.h"
#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/tensor_shape.pb.h"
#include "tensorflow/core/framework/types.pb.h"
#include "tensorflow/core/protobuf/meta_graph.pb.h"
#include "tensorflow/core/public/session.h"
#include "tensorflow/core/public/session_options.h"

namespace {

namespace fs = std::filesystem;

// TF Serving loads models with this tag (tag_constants.h is not shipped in the
// pip wheel, so spell it out).
constexpr char kServeTag[] = "serve";
constexpr char kDefaultSignature[] = "serving_default";
constexpr char kInitOpSignature[] = "__saved_model_init_op";
constexpr char kProg[] = "serving_check";

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void Fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw Error(os.str());
}

std::string OneLine(std::string s) {
  for (char& c : s) {
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  }
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

std::string Join(const std::vector<std::string>& parts, const char* sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i) out += sep;
    out += parts[i];
  }
  return out;
}

// The dimensions as decimal numbers, joined by `sep`.
std::string JoinDims(const std::vector<int64_t>& dims, const char* sep) {
  std::vector<std::string> parts;
  parts.reserve(dims.size());
  for (int64_t d : dims) parts.push_back(std::to_string(d));
  return Join(parts, sep);
}

// "[2,32,32,3]": shapes in messages and in the output summary lines.
std::string ShapeString(const std::vector<int64_t>& dims) {
  return "[" + JoinDims(dims, ",") + "]";
}

// ---------------------------------------------------------------------------
// dtype table: TF DataType <-> numpy descr.
// ---------------------------------------------------------------------------

struct DtypeInfo {
  tensorflow::DataType tf;
  const char* numpy_name;  // for messages / the printed summary
  char kind;               // numpy kind character: f, i, u, b, c
  int itemsize;
};

const DtypeInfo kDtypes[] = {
    {tensorflow::DT_HALF, "float16", 'f', 2},
    {tensorflow::DT_FLOAT, "float32", 'f', 4},
    {tensorflow::DT_DOUBLE, "float64", 'f', 8},
    {tensorflow::DT_INT8, "int8", 'i', 1},
    {tensorflow::DT_INT16, "int16", 'i', 2},
    {tensorflow::DT_INT32, "int32", 'i', 4},
    {tensorflow::DT_INT64, "int64", 'i', 8},
    {tensorflow::DT_UINT8, "uint8", 'u', 1},
    {tensorflow::DT_UINT16, "uint16", 'u', 2},
    {tensorflow::DT_UINT32, "uint32", 'u', 4},
    {tensorflow::DT_UINT64, "uint64", 'u', 8},
    {tensorflow::DT_BOOL, "bool", 'b', 1},
    {tensorflow::DT_COMPLEX64, "complex64", 'c', 8},
    {tensorflow::DT_COMPLEX128, "complex128", 'c', 16},
};

const DtypeInfo* FindByTf(tensorflow::DataType dt) {
  for (const auto& d : kDtypes) {
    if (d.tf == dt) return &d;
  }
  return nullptr;
}

const DtypeInfo* FindByKind(char kind, int itemsize) {
  for (const auto& d : kDtypes) {
    if (d.kind == kind && d.itemsize == itemsize) return &d;
  }
  return nullptr;
}

std::string TfDtypeName(tensorflow::DataType dt) {
  if (const DtypeInfo* d = FindByTf(dt)) return d->numpy_name;
  if (dt == tensorflow::DT_STRING) return "string";
  // DataType_Name gives e.g. "DT_BFLOAT16".
  std::string name = tensorflow::DataType_Name(dt);
  if (name.empty()) name = "dtype#" + std::to_string(static_cast<int>(dt));
  return name;
}

// ---------------------------------------------------------------------------
// .npy reading and writing (format versions 1.0, 2.0 and 3.0).
// ---------------------------------------------------------------------------

constexpr char kNpyMagic[] = "\x93NUMPY";
constexpr size_t kNpyMagicLen = 6;

struct NpyArray {
  tensorflow::DataType dtype = tensorflow::DT_INVALID;
  std::vector<int64_t> shape;
  // For numeric dtypes: raw little-endian C-order bytes.
  std::string data;
  // For DT_STRING (numpy 'S'): one entry per element.
  std::vector<std::string> strings;
};

// Minimal parser for the header dict, e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path)
      : s_(text), path_(path) {}

  void Parse(std::string* descr, bool* fortran, std::vector<int64_t>* shape) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    Expect('{');
    while (true) {
      SkipWs();
      if (Peek() == '}') {
        ++i_;
        break;
      }
      std::string key = ParseString();
      Expect(':');
      SkipWs();
      if (key == "descr") {
        if (Peek() != '\'' && Peek() != '"') {
          Bad("structured dtypes are not supported");
        }
        *descr = ParseString();
        have_descr = true;
      } else if (key == "fortran_order") {
        *fortran = ParseBool();
        have_fortran = true;
      } else if (key == "shape") {
        *shape = ParseShape();
        have_shape = true;
      } else {
        Bad("unexpected header key '" + key + "'");
      }
      SkipWs();
      if (Peek() == ',') {
        ++i_;
        continue;
      }
      SkipWs();
      if (Peek() == '}') {
        ++i_;
        break;
      }
      Bad("malformed header dict");
    }
    if (!have_descr || !have_fortran || !have_shape) {
      Bad("header lacks 'descr', 'fortran_order' or 'shape'");
    }
  }

 private:
  [[noreturn]] void Bad(const std::string& why) {
    Fail(path_, ": invalid .npy header (", why, "): ", OneLine(s_));
  }
  char Peek() { return i_ < s_.size() ? s_[i_] : '\0'; }
  void SkipWs() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_])))
      ++i_;
  }
  void Expect(char c) {
    SkipWs();
    if (Peek() != c) Bad(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string ParseString() {
    SkipWs();
    char q = Peek();
    if (q != '\'' && q != '"') Bad("expected a quoted string");
    ++i_;
    size_t end = s_.find(q, i_);
    if (end == std::string::npos) Bad("unterminated string");
    std::string out = s_.substr(i_, end - i_);
    i_ = end + 1;
    return out;
  }
  bool ParseBool() {
    if (s_.compare(i_, 4, "True") == 0) {
      i_ += 4;
      return true;
    }
    if (s_.compare(i_, 5, "False") == 0) {
      i_ += 5;
      return false;
    }
    Bad("expected True or False");
  }
  std::vector<int64_t> ParseShape() {
    std::vector<int64_t> dims;
    Expect('(');
    while (true) {
      SkipWs();
      if (Peek() == ')') {
        ++i_;
        return dims;
      }
      if (!std::isdigit(static_cast<unsigned char>(Peek()))) {
        Bad("expected a dimension");
      }
      int64_t v = 0;
      while (std::isdigit(static_cast<unsigned char>(Peek()))) {
        v = v * 10 + (Peek() - '0');
        if (v > (int64_t{1} << 50)) Bad("dimension too large");
        ++i_;
      }
      // numpy 1.x may write "3L" in very old Python 2 files.
      if (Peek() == 'L') ++i_;
      dims.push_back(v);
      SkipWs();
      if (Peek() == ',') ++i_;
    }
  }

  const std::string& s_;
  const std::string& path_;
  size_t i_ = 0;
};

uint32_t ReadLe(const unsigned char* p, int n) {
  uint32_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

NpyArray ReadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail("cannot open ", path, ": ", std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(f)),
                    std::istreambuf_iterator<char>());
  if (bytes.size() < kNpyMagicLen + 2 ||
      bytes.compare(0, kNpyMagicLen, kNpyMagic, kNpyMagicLen) != 0) {
    Fail(path, ": not a .npy file (bad magic)");
  }
  const auto* u = reinterpret_cast<const unsigned char*>(bytes.data());
  int major = u[6], minor = u[7];
  size_t header_len, header_start;
  if (major == 1) {
    if (bytes.size() < 10) Fail(path, ": truncated .npy header");
    header_len = ReadLe(u + 8, 2);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) Fail(path, ": truncated .npy header");
    header_len = ReadLe(u + 8, 4);
    header_start = 12;
  } else {
    Fail(path, ": unsupported .npy format version ", major, ".", minor);
  }
  if (bytes.size() < header_start + header_len) {
    Fail(path, ": truncated .npy header");
  }
  std::string header = bytes.substr(header_start, header_len);
  std::string descr;
  bool fortran = false;
  NpyArray arr;
  HeaderParser(header, path).Parse(&descr, &fortran, &arr.shape);
  if (fortran) {
    Fail(path, ": Fortran-order arrays are not supported; save with "
               "np.ascontiguousarray(x)");
  }
  if (descr.size() < 3) Fail(path, ": unsupported dtype '", descr, "'");
  char order = descr[0], kind = descr[1];
  int itemsize = std::atoi(descr.c_str() + 2);
  if (order != '<' && order != '|' && order != '=' &&
      !(order == '>' && itemsize == 1)) {
    Fail(path, ": big-endian dtype '", descr,
         "' is not supported; convert with x.astype(x.dtype.newbyteorder('<'))");
  }
  int64_t count = 1;
  for (int64_t d : arr.shape) count *= d;
  const size_t data_start = header_start + header_len;
  const size_t avail = bytes.size() - data_start;
  if (kind == 'S') {
    if (itemsize <= 0) Fail(path, ": unsupported dtype '", descr, "'");
    if (avail != static_cast<size_t>(count) * itemsize) {
      Fail(path, ": data size ", avail, " does not match shape ",
           ShapeString(arr.shape), " and dtype ", descr);
    }
    arr.dtype = tensorflow::DT_STRING;
    arr.strings.reserve(count);
    for (int64_t i = 0; i < count; ++i) {
      std::string s = bytes.substr(data_start + i * itemsize, itemsize);
      // numpy 'S' strips trailing NUL bytes.
      while (!s.empty() && s.back() == '\0') s.pop_back();
      arr.strings.push_back(std::move(s));
    }
    return arr;
  }
  const DtypeInfo* info = FindByKind(kind, itemsize);
  if (info == nullptr) {
    Fail(path, ": unsupported dtype '", descr,
         "' (supported: float16/32/64, int8/16/32/64, uint8/16/32/64, bool, "
         "complex64/128, bytes 'S')");
  }
  if (avail != static_cast<size_t>(count) * info->itemsize) {
    Fail(path, ": data size ", avail, " does not match shape ",
         ShapeString(arr.shape), " and dtype ", descr);
  }
  arr.dtype = info->tf;
  arr.data = bytes.substr(data_start);
  return arr;
}

// "(2, 32, 32, 3)": the Python tuple of an .npy header ("(5,)" for one dimension).
std::string NpyShapeTuple(const std::vector<int64_t>& dims) {
  return "(" + JoinDims(dims, ", ") + (dims.size() == 1 ? "," : "") + ")";
}

void WriteNpy(const fs::path& path, const std::string& descr,
              const std::vector<int64_t>& shape, const std::string& data) {
  std::string dict = "{'descr': '" + descr +
                     "', 'fortran_order': False, 'shape': " +
                     NpyShapeTuple(shape) + ", }";
  // Total header (magic + version + length + dict + padding + '\n') is a
  // multiple of 64 bytes, as numpy writes it.
  std::string out(kNpyMagic, kNpyMagicLen);
  size_t prefix = kNpyMagicLen + 2 + 2;
  bool v2 = false;
  size_t total = prefix + dict.size() + 1;
  size_t padded = (total + 63) / 64 * 64;
  if (padded - prefix > 0xFFFF) {
    v2 = true;
    prefix = kNpyMagicLen + 2 + 4;
    total = prefix + dict.size() + 1;
    padded = (total + 63) / 64 * 64;
  }
  dict.append(padded - total, ' ');
  dict += '\n';
  out += static_cast<char>(v2 ? 2 : 1);
  out += static_cast<char>(0);
  uint32_t len = static_cast<uint32_t>(dict.size());
  for (int i = 0; i < (v2 ? 4 : 2); ++i) {
    out += static_cast<char>((len >> (8 * i)) & 0xFF);
  }
  out += dict;
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) Fail("cannot write ", path.string(), ": ", std::strerror(errno));
  f.write(out.data(), out.size());
  f.write(data.data(), data.size());
  f.close();
  if (!f) Fail("error writing ", path.string());
}

std::vector<int64_t> TensorDims(const tensorflow::Tensor& t) {
  std::vector<int64_t> dims;
  for (int i = 0; i < t.dims(); ++i) dims.push_back(t.dim_size(i));
  return dims;
}

void WriteTensorNpy(const fs::path& path, const tensorflow::Tensor& t,
                    const std::string& what) {
  std::vector<int64_t> dims = TensorDims(t);
  if (t.dtype() == tensorflow::DT_STRING) {
    auto flat = t.flat<tensorflow::tstring>();
    size_t width = 1;
    for (int64_t i = 0; i < flat.size(); ++i) {
      width = std::max(width, flat(i).size());
    }
    std::string data;
    data.reserve(width * flat.size());
    for (int64_t i = 0; i < flat.size(); ++i) {
      std::string s(flat(i).data(), flat(i).size());
      s.resize(width, '\0');
      data += s;
    }
    WriteNpy(path, "|S" + std::to_string(width), dims, data);
    return;
  }
  const DtypeInfo* info = FindByTf(t.dtype());
  if (info == nullptr) {
    Fail(what, " has dtype ", TfDtypeName(t.dtype()),
         " which cannot be written as .npy");
  }
  std::string descr;
  descr += (info->itemsize == 1 ? '|' : '<');
  descr += info->kind;
  descr += std::to_string(info->itemsize);
  auto bytes = t.tensor_data();
  WriteNpy(path, descr, dims, std::string(bytes.data(), bytes.size()));
}

// ---------------------------------------------------------------------------
// Input tensors.
// ---------------------------------------------------------------------------

tensorflow::TensorShape MakeShape(const std::vector<int64_t>& dims,
                                  const std::string& what) {
  tensorflow::TensorShape shape;
  auto status = tensorflow::TensorShape::BuildTensorShape(dims, &shape);
  if (!status.ok()) {
    Fail(what, ": invalid shape ", ShapeString(dims), ": ", status.message());
  }
  return shape;
}

// Signature shape: nullopt-like flag for unknown rank, -1 for unknown dims.
struct SigShape {
  bool unknown_rank = false;
  std::vector<int64_t> dims;
};

SigShape GetSigShape(const tensorflow::TensorInfo& info) {
  SigShape s;
  if (!info.has_tensor_shape() || info.tensor_shape().unknown_rank()) {
    s.unknown_rank = true;
    return s;
  }
  for (const auto& d : info.tensor_shape().dim()) s.dims.push_back(d.size());
  return s;
}

std::string SigShapeString(const SigShape& s) {
  if (s.unknown_rank) return "<unknown rank>";
  std::string out = "[";
  for (size_t i = 0; i < s.dims.size(); ++i) {
    if (i) out += ",";
    out += s.dims[i] < 0 ? std::string("?") : std::to_string(s.dims[i]);
  }
  return out + "]";
}

bool ShapeCompatible(const SigShape& sig, const std::vector<int64_t>& dims) {
  if (sig.unknown_rank) return true;
  if (sig.dims.size() != dims.size()) return false;
  for (size_t i = 0; i < dims.size(); ++i) {
    if (sig.dims[i] >= 0 && sig.dims[i] != dims[i]) return false;
  }
  return true;
}

tensorflow::Tensor TensorFromNpy(const NpyArray& arr, const std::string& what) {
  tensorflow::Tensor t(arr.dtype, MakeShape(arr.shape, what));
  if (arr.dtype == tensorflow::DT_STRING) {
    auto flat = t.flat<tensorflow::tstring>();
    for (int64_t i = 0; i < flat.size(); ++i) flat(i) = arr.strings[i];
    return t;
  }
  auto dst = t.tensor_data();
  if (dst.size() != arr.data.size()) {
    Fail(what, ": internal size mismatch");
  }
  if (!arr.data.empty()) {
    std::memcpy(const_cast<char*>(dst.data()), arr.data.data(),
                arr.data.size());
  }
  return t;
}

// SplitMix64: small, portable, fully specified PRNG so generated inputs are
// identical on every platform / standard library.
struct SplitMix64 {
  uint64_t state;
  uint64_t Next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

tensorflow::Tensor GenerateInput(const std::string& name,
                                 const tensorflow::TensorInfo& info,
                                 const std::vector<int64_t>* shape_override,
                                 int64_t batch, SplitMix64* rng) {
  const std::string what = "input '" + name + "'";
  SigShape sig = GetSigShape(info);
  std::vector<int64_t> dims;
  if (shape_override != nullptr) {
    dims = *shape_override;
    if (!ShapeCompatible(sig, dims)) {
      Fail("--shape ", name, "=", ShapeString(dims),
           " is incompatible with the signature shape ", SigShapeString(sig));
    }
  } else {
    if (sig.unknown_rank) {
      Fail(what, " has unknown rank in the signature; pass --input ", name,
           "=FILE.npy or --shape ", name, "=D0,D1,...");
    }
    dims = sig.dims;
    for (size_t i = 0; i < dims.size(); ++i) {
      if (dims[i] < 0) dims[i] = (i == 0) ? batch : 1;
    }
  }
  tensorflow::DataType dt = info.dtype();
  if (dt == tensorflow::DT_STRING) {
    Fail(what, " has dtype string and cannot be generated; pass --input ",
         name, "=FILE.npy (numpy 'S' dtype)");
  }
  const DtypeInfo* di = FindByTf(dt);
  if (di == nullptr) {
    Fail(what, " has unsupported dtype ", TfDtypeName(dt));
  }
  tensorflow::Tensor t(dt, MakeShape(dims, what));
  const int64_t n = t.NumElements();
  char* raw = const_cast<char*>(t.tensor_data().data());
  if (n > 0) std::memset(raw, 0, static_cast<size_t>(n) * di->itemsize);
  switch (dt) {
    case tensorflow::DT_FLOAT: {
      auto* p = reinterpret_cast<float*>(raw);
      // 24 random bits -> exactly representable float in [0, 1).
      for (int64_t i = 0; i < n; ++i) {
        p[i] = static_cast<float>(rng->Next() >> 40) * (1.0f / 16777216.0f);
      }
      break;
    }
    case tensorflow::DT_DOUBLE: {
      auto* p = reinterpret_cast<double*>(raw);
      for (int64_t i = 0; i < n; ++i) {
        p[i] = static_cast<double>(rng->Next() >> 11) *
               (1.0 / 9007199254740992.0);
      }
      break;
    }
    case tensorflow::DT_HALF: {
      auto* p = reinterpret_cast<Eigen::half*>(raw);
      // 11 random bits -> exactly representable half in [0, 1).
      for (int64_t i = 0; i < n; ++i) {
        p[i] = Eigen::half(static_cast<float>(rng->Next() >> 53) *
                           (1.0f / 2048.0f));
      }
      break;
    }
    case tensorflow::DT_COMPLEX64: {
      auto* p = reinterpret_cast<float*>(raw);
      for (int64_t i = 0; i < 2 * n; ++i) {
        p[i] = static_cast<float>(rng->Next() >> 40) * (1.0f / 16777216.0f);
      }
      break;
    }
    case tensorflow::DT_COMPLEX128: {
      auto* p = reinterpret_cast<double*>(raw);
      for (int64_t i = 0; i < 2 * n; ++i) {
        p[i] = static_cast<double>(rng->Next() >> 11) *
               (1.0 / 9007199254740992.0);
      }
      break;
    }
    default:
      break;  // integers and bools: zeros
  }
  return t;
}

// ---------------------------------------------------------------------------
// Command line.
// ---------------------------------------------------------------------------

const char kUsage[] =
    "usage: serving_check --model DIR [--signature KEY] "
    "[--input NAME=FILE.npy ...]\n"
    "                     [--shape NAME=D0,D1,... ...] [--batch N] "
    "[--seed S] --output_dir OUT\n"
    "\n"
    "Loads DIR with tensorflow::LoadSavedModel and tag \"serve\" (as TF "
    "Serving does),\n"
    "runs SignatureDef KEY (default serving_default) with Session::Run and "
    "writes\n"
    "OUT/<output key>.npy for every output and OUT/input_<name>.npy for every "
    "generated\n"
    "input.  Inputs without --input are generated from the signature: unknown "
    "first dim\n"
    "-> --batch (default 2), other unknown dims -> 1 (override with --shape); "
    "floats\n"
    "uniform in [0,1) from --seed (default 0), integers and bools zero.\n"
    "Prints \"<key> <dtype> [dims]\" per output.  Exit status: 0 ok, 1 "
    "error.\n";

struct Args {
  std::string model;
  std::string signature = kDefaultSignature;
  std::string output_dir;
  std::map<std::string, std::string> inputs;
  std::map<std::string, std::vector<int64_t>> shapes;
  int64_t batch = 2;
  uint64_t seed = 0;
};

int64_t ParseInt(const std::string& s, const std::string& what) {
  if (s.empty()) Fail("empty value for ", what);
  size_t pos = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &pos, 10);
  } catch (const std::exception&) {
    Fail("invalid integer '", s, "' for ", what);
  }
  if (pos != s.size()) Fail("invalid integer '", s, "' for ", what);
  return v;
}

std::pair<std::string, std::string> SplitAssign(const std::string& v,
                                                const std::string& flag) {
  size_t eq = v.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == v.size()) {
    Fail(flag, " expects NAME=VALUE, got '", v, "'");
  }
  return {v.substr(0, eq), v.substr(eq + 1)};
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    std::string flag = arg, value;
    bool inline_value = false;
    size_t eq = arg.find('=');
    if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      flag = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      inline_value = true;
    }
    static const std::set<std::string> kFlags = {
        "--model", "--signature", "--input", "--shape",
        "--batch", "--seed",      "--output_dir"};
    if (!kFlags.count(flag)) {
      Fail("unknown argument '", arg, "' (see --help)");
    }
    if (!inline_value) {
      if (i + 1 >= argc) Fail(flag, " requires a value");
      value = argv[++i];
    }
    if (flag == "--model") {
      a.model = value;
    } else if (flag == "--signature") {
      a.signature = value;
    } else if (flag == "--output_dir") {
      a.output_dir = value;
    } else if (flag == "--input") {
      auto [name, file] = SplitAssign(value, "--input");
      if (!a.inputs.emplace(name, file).second) {
        Fail("--input ", name, " given more than once");
      }
    } else if (flag == "--shape") {
      auto [name, spec] = SplitAssign(value, "--shape");
      std::vector<int64_t> dims;
      if (spec != "scalar") {
        std::stringstream ss(spec);
        std::string part;
        while (std::getline(ss, part, ',')) {
          int64_t d = ParseInt(part, "--shape " + name);
          if (d < 0) Fail("--shape ", name, ": negative dimension ", d);
          dims.push_back(d);
        }
      }
      if (!a.shapes.emplace(name, dims).second) {
        Fail("--shape ", name, " given more than once");
      }
    } else if (flag == "--batch") {
      a.batch = ParseInt(value, "--batch");
      if (a.batch < 0) Fail("--batch must be >= 0");
    } else if (flag == "--seed") {
      int64_t s = ParseInt(value, "--seed");
      a.seed = static_cast<uint64_t>(s);
    }
  }
  if (a.model.empty()) Fail("--model is required (see --help)");
  if (a.output_dir.empty()) Fail("--output_dir is required (see --help)");
  for (const auto& [name, unused] : a.shapes) {
    if (a.inputs.count(name)) {
      Fail("both --input and --shape given for '", name, "'");
    }
  }
  return a;
}

bool SafeFileStem(const std::string& key) {
  if (key.empty() || key == "." || key == "..") return false;
  return key.find('/') == std::string::npos &&
         key.find('\0') == std::string::npos;
}

// TF logs through absl; hide its INFO chatter (LoadSavedModel progress) so
// the error line stands out.  TF_CPP_MIN_LOG_LEVEL=0 brings it back.  Lines
// logged by static initializers before main() cannot be suppressed here.
void QuietTfLogging() {
  int level = 1;  // WARNING
  if (const char* env = std::getenv("TF_CPP_MIN_LOG_LEVEL")) {
    if (*env >= '0' && *env <= '3' && env[1] == '\0') level = *env - '0';
  }
  static const absl::LogSeverityAtLeast kLevels[] = {
      absl::LogSeverityAtLeast::kInfo, absl::LogSeverityAtLeast::kWarning,
      absl::LogSeverityAtLeast::kError, absl::LogSeverityAtLeast::kFatal};
  absl::SetMinLogLevel(kLevels[level]);
}

int Run(int argc, char** argv) {
  Args args = ParseArgs(argc, argv);

  std::error_code ec;
  if (!fs::exists(args.model, ec)) {
    Fail("model directory does not exist: ", args.model);
  }
  if (!fs::is_directory(args.model, ec)) {
    Fail("model path is not a directory: ", args.model);
  }
  if (!tensorflow::MaybeSavedModelDirectory(args.model)) {
    Fail("not a SavedModel directory (no saved_model.pb or saved_model.pbtxt): ",
         args.model);
  }

  // Exactly TF Serving's loading path.
  tensorflow::SessionOptions session_options;
  tensorflow::RunOptions run_options;
  tensorflow::SavedModelBundle bundle;
  auto status = tensorflow::LoadSavedModel(session_options, run_options,
                                           args.model, {kServeTag}, &bundle);
  if (!status.ok()) {
    Fail("LoadSavedModel(", args.model, ", tags={\"serve\"}) failed: ",
         status.ToString());
  }

  const auto& signatures = bundle.GetSignatures();
  auto sig_it = signatures.find(args.signature);
  if (sig_it == signatures.end()) {
    std::vector<std::string> keys;
    for (const auto& kv : signatures) {
      if (kv.first != kInitOpSignature) keys.push_back(kv.first);
    }
    std::sort(keys.begin(), keys.end());
    Fail("signature '", args.signature, "' not found in ", args.model,
         "; available signatures: ",
         keys.empty() ? std::string("(none)") : Join(keys, ", "));
  }
  const tensorflow::SignatureDef& sig = sig_it->second;

  // Sorted keys -> deterministic generation order and file names.
  std::vector<std::string> input_keys, output_keys;
  for (const auto& kv : sig.inputs()) input_keys.push_back(kv.first);
  for (const auto& kv : sig.outputs()) output_keys.push_back(kv.first);
  std::sort(input_keys.begin(), input_keys.end());
  std::sort(output_keys.begin(), output_keys.end());
  if (output_keys.empty()) {
    Fail("signature '", args.signature, "' has no outputs");
  }

  auto check_names = [&](const auto& given, const char* flag) {
    for (const auto& kv : given) {
      if (!sig.inputs().count(kv.first)) {
        Fail(flag, " ", kv.first, ": signature '", args.signature,
             "' has no such input; inputs: ", Join(input_keys, ", "));
      }
    }
  };
  check_names(args.inputs, "--input");
  check_names(args.shapes, "--shape");

  for (const auto& key : output_keys) {
    if (!SafeFileStem(key)) {
      Fail("output key '", key, "' cannot be used as a file name");
    }
  }
  for (const auto& key : input_keys) {
    if (!args.inputs.count(key) && !SafeFileStem("input_" + key)) {
      Fail("input key '", key, "' cannot be used as a file name");
    }
  }

  fs::path out_dir(args.output_dir);
  fs::create_directories(out_dir, ec);
  if (ec || !fs::is_directory(out_dir)) {
    Fail("cannot create output directory ", args.output_dir, ": ",
         ec ? ec.message() : std::string("not a directory"));
  }

  SplitMix64 rng{args.seed};
  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
  std::set<std::string> written;
  for (const auto& key : input_keys) {
    const tensorflow::TensorInfo& info = sig.inputs().at(key);
    if (info.name().empty()) {
      Fail("input '", key, "' is not a dense tensor (sparse/composite "
           "signature inputs are not supported)");
    }
    const std::string what = "input '" + key + "'";
    auto file_it = args.inputs.find(key);
    if (file_it != args.inputs.end()) {
      NpyArray arr = ReadNpy(file_it->second);
      if (arr.dtype != info.dtype()) {
        Fail(what, ": ", file_it->second, " has dtype ",
             TfDtypeName(arr.dtype), " but the signature expects ",
             TfDtypeName(info.dtype()));
      }
      SigShape ss = GetSigShape(info);
      if (!ShapeCompatible(ss, arr.shape)) {
        Fail(what, ": ", file_it->second, " has shape ",
             ShapeString(arr.shape), " incompatible with the signature shape ",
             SigShapeString(ss));
      }
      feeds.emplace_back(info.name(), TensorFromNpy(arr, what));
    } else {
      auto shape_it = args.shapes.find(key);
      tensorflow::Tensor t = GenerateInput(
          key, info, shape_it == args.shapes.end() ? nullptr : &shape_it->second,
          args.batch, &rng);
      std::string fname = "input_" + key + ".npy";
      WriteTensorNpy(out_dir / fname, t, what);
      written.insert(fname);
      feeds.emplace_back(info.name(), std::move(t));
    }
  }

  std::vector<std::string> fetch_names;
  for (const auto& key : output_keys) {
    const tensorflow::TensorInfo& info = sig.outputs().at(key);
    if (info.name().empty()) {
      Fail("output '", key, "' is not a dense tensor (sparse/composite "
           "signature outputs are not supported)");
    }
    if (written.count(key + ".npy")) {
      Fail("output key '", key, "' collides with a generated input file");
    }
    fetch_names.push_back(info.name());
  }

  std::vector<tensorflow::Tensor> outputs;
  tensorflow::RunMetadata run_metadata;
  status = bundle.GetSession()->Run(run_options, feeds, fetch_names, {},
                                    &outputs, &run_metadata);
  if (!status.ok()) {
    Fail("Session::Run of signature '", args.signature,
         "' failed: ", status.ToString());
  }
  if (outputs.size() != output_keys.size()) {
    Fail("Session::Run returned ", outputs.size(), " tensors, expected ",
         output_keys.size());
  }

  std::ostringstream summary;
  for (size_t i = 0; i < output_keys.size(); ++i) {
    const std::string& key = output_keys[i];
    const tensorflow::Tensor& t = outputs[i];
    WriteTensorNpy(out_dir / (key + ".npy"), t, "output '" + key + "'");
    summary << key << " " << TfDtypeName(t.dtype()) << " "
            << ShapeString(TensorDims(t)) << "\n";
  }
  std::cout << summary.str() << std::flush;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  QuietTfLogging();
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::cout << std::flush;
    std::cerr << kProg << ": error: " << OneLine(e.what()) << std::endl;
    return 1;
  } catch (...) {
    std::cerr << kProg << ": error: unknown exception" << std::endl;
    return 1;
  }
}
