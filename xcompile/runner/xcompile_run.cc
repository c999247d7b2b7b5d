// xcompile_run: run an xcompile build folder with nothing but the TVM runtime.
//
//   xcompile_run BUILD_DIR --input X.npy [--output Y.npy] [--outputs DIR] [--repeat N]
//                [--raw-weights DIR] [--serve]
//
// Reads BUILD_DIR/manifest.json, checks the SHA-256 of the module and the weights it
// names against it (a damaged or foreign .so is never opened), loads the module (a
// Relax VM executable) and the weights (TVM's parameter format), and runs
// `main(input, *weights)` with the weights in the manifest's order on the build's
// device (the CPU, or CUDA GPU 0 for a CUDA build). The input's dtype and shape must be
// the manifest's. --output writes the first output, --outputs DIR every output as
// DIR/0.npy, DIR/1.npy...; the median latency is printed. --raw-weights DIR takes the
// model's raw (ONNX) weights as DIR/0000.npy, DIR/0001.npy... instead of params.bin and
// makes main's weights from them with the build's own weight transform (its CPU
// modules, checked like the module), as a refit does. --serve then keeps the model
// loaded and times "run N" requests read from stdin. Links libtvm_runtime and
// libtvm_ffi only; a CUDA build loads libtvm_runtime_cuda.so (and through it the CUDA
// runtime and driver) at run time. Every failure is one `error: ...` line on stderr and
// exit status 2.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int64_t kMaxRepeat = 1000000;

// A regular file's bytes (a FIFO or a device would block or never end).
std::string ReadFile(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw UserError("cannot read " + path + ": not found");
  if (!S_ISREG(st.st_mode)) throw UserError(path + " is not a regular file");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UserError("cannot read " + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// ---------------------------------------------------------------- SHA-256 (FIPS 180-4)

// Incremental: the weights are hashed as they are read into their tensors.
class Sha256 {
 public:
  void Update(const void* data, size_t n) {
    const unsigned char* p = static_cast<const unsigned char*>(data);
    total_ += n;
    while (n > 0) {
      size_t take = std::min(n, size_t(64) - fill_);
      std::memcpy(block_ + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ == 64) {
        Compress(block_);
        fill_ = 0;
      }
    }
  }

  std::string Hex() {
    uint64_t bits = total_ * 8;
    unsigned char pad[72] = {0x80};
    size_t padding = (fill_ < 56 ? 56 : 120) - fill_;
    Update(pad, padding);
    unsigned char length[8];
    for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    Update(length, 8);
    std::ostringstream out;
    for (uint32_t v : h_) out << std::hex << std::setw(8) << std::setfill('0') << v;
    return out.str();
  }

 private:
  static uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void Compress(const unsigned char* block) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      const unsigned char* p = block + 4 * i;
      w[i] = uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3];
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6],
             hh = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] +
                    w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h_[0] += a; h_[1] += b; h_[2] += c; h_[3] += d; h_[4] += e; h_[5] += f; h_[6] += g;
    h_[7] += hh;
  }

  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char block_[64];
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

std::string Sha256Hex(const std::string& data) {
  Sha256 sha;
  sha.Update(data.data(), data.size());
  return sha.Hex();
}

// ---------------------------------------------------------------- the manifest

// What the runner needs of manifest.json, checked as it is read: a damaged manifest is
// refused before any other file is opened.
struct TensorSpec {
  std::string name, dtype;
  std::vector<int64_t> shape;
};

struct Manifest {
  std::string module, params, device, input_dtype;
  std::vector<int64_t> input_shape;
  std::vector<std::string> weight_names;
  std::string module_sha, params_sha;
  // The weight transform: its stage modules (file, checksum) and the raw weights it takes.
  std::vector<std::pair<std::string, std::string>> transform;
  std::vector<TensorSpec> raw;
};

[[noreturn]] void Damaged(const std::string& dir, const std::string& why) {
  throw UserError(dir + "/manifest.json is damaged: " + why);
}

ffi::Any Field(const ffi::Map<ffi::Any, ffi::Any>& obj, const char* key, const std::string& dir) {
  auto it = obj.find(ffi::String(key));
  if (it == obj.end()) Damaged(dir, std::string("no \"") + key + "\"");
  return (*it).second;
}

std::string Str(const ffi::Any& v, const char* what, const std::string& dir) {
  auto s = v.try_cast<ffi::String>();
  if (!s.has_value()) Damaged(dir, std::string(what) + " is not a string");
  return std::string(*s);
}

ffi::Map<ffi::Any, ffi::Any> Obj(const ffi::Any& v, const char* what, const std::string& dir) {
  auto m = v.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!m.has_value()) Damaged(dir, std::string(what) + " is not an object");
  return *m;
}

ffi::Array<ffi::Any> Arr(const ffi::Any& v, const char* what, const std::string& dir) {
  auto a = v.try_cast<ffi::Array<ffi::Any>>();
  if (!a.has_value()) Damaged(dir, std::string(what) + " is not a list");
  return *a;
}

// A file of the build: a plain name inside the folder, never a path out of it.
std::string PlainName(const std::string& name, const std::string& dir) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.find('\0') != std::string::npos) {
    Damaged(dir, "\"" + name + "\" is not a file name inside the build");
  }
  return name;
}

Manifest ReadManifest(const std::string& dir) {
  std::string text = ReadFile(dir + "/manifest.json");
  ffi::String error;
  ffi::Any root = ffi::json::Parse(ffi::String(text), &error);
  if (error.size() > 0) Damaged(dir, "not JSON");
  auto m = Obj(root, "the manifest", dir);
  auto format = Field(m, "format", dir).try_cast<int64_t>();
  if (!format.has_value() || *format != 1) Damaged(dir, "unknown format (expected 1)");
  Manifest out;
  out.module = PlainName(Str(Field(m, "module", dir), "module", dir), dir);
  auto params = Obj(Field(m, "params", dir), "params", dir);
  out.params = PlainName(Str(Field(params, "file", dir), "params.file", dir), dir);
  for (const ffi::Any& n : Arr(Field(params, "names", dir), "params.names", dir)) {
    out.weight_names.push_back(Str(n, "a weight name", dir));
  }
  auto target = Obj(Field(m, "target", dir), "target", dir);
  out.device = Str(Field(target, "device", dir), "target.device", dir);
  if (out.device != "cpu" && out.device != "cuda") Damaged(dir, "unknown device " + out.device);
  auto inputs = Arr(Field(m, "inputs", dir), "inputs", dir);
  if (inputs.size() != 1) Damaged(dir, "expected one input");
  auto input = Obj(inputs[0], "inputs[0]", dir);
  out.input_dtype = Str(Field(input, "dtype", dir), "the input dtype", dir);
  for (const ffi::Any& d : Arr(Field(input, "shape", dir), "the input shape", dir)) {
    auto v = d.try_cast<int64_t>();
    if (!v.has_value() || *v < 1) Damaged(dir, "the input shape holds a non-positive integer");
    out.input_shape.push_back(*v);
  }
  auto sums = Obj(Field(m, "sha256", dir), "sha256", dir);
  out.module_sha = Str(Field(sums, out.module.c_str(), dir), "a checksum", dir);
  out.params_sha = Str(Field(sums, out.params.c_str(), dir), "a checksum", dir);
  if (m.find(ffi::String("transform")) != m.end()) {
    auto transform = Obj(Field(m, "transform", dir), "transform", dir);
    for (const ffi::Any& f : Arr(Field(transform, "files", dir), "transform.files", dir)) {
      std::string name = PlainName(Str(f, "a transform file", dir), dir);
      out.transform.emplace_back(name, Str(Field(sums, name.c_str(), dir), "a checksum", dir));
    }
    for (const ffi::Any& r : Arr(Field(transform, "raw", dir), "transform.raw", dir)) {
      auto raw = Obj(r, "a raw weight", dir);
      TensorSpec spec{Str(Field(raw, "name", dir), "a raw weight's name", dir),
                      Str(Field(raw, "dtype", dir), "a raw weight's dtype", dir), {}};
      for (const ffi::Any& d : Arr(Field(raw, "shape", dir), "a raw weight's shape", dir)) {
        auto v = d.try_cast<int64_t>();
        if (!v.has_value() || *v < 0) Damaged(dir, "a raw weight's shape is not sizes");
        spec.shape.push_back(*v);
      }
      out.raw.push_back(spec);
    }
  }
  return out;
}

// A file of the build, read once and checked against the manifest's SHA-256.
std::string ReadChecked(const std::string& dir, const std::string& name, const std::string& sha) {
  std::string path = dir + "/" + name;
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw UserError(dir + " is incomplete: " + name + " is missing");
  std::string data = ReadFile(path);
  if (Sha256Hex(data) != sha) {
    throw UserError(path + " is damaged or was changed after the build (SHA-256 differs from "
                    "the manifest)");
  }
  return data;
}

// ---------------------------------------------------------------- shared objects

#if defined(__aarch64__)
constexpr uint16_t kThisMachine = EM_AARCH64;
constexpr const char* kThisArch = "aarch64";
#else
constexpr uint16_t kThisMachine = EM_X86_64;
constexpr const char* kThisArch = "x86_64";
#endif

// dlopen of a truncated shared object can kill the process with SIGBUS, so check the
// headers against the file size (and the architecture) first.
void CheckSharedObject(const std::string& path, const std::string& data) {
  if (data.size() < sizeof(Elf64_Ehdr) || std::memcmp(data.data(), ELFMAG, SELFMAG) != 0 ||
      data[EI_CLASS] != ELFCLASS64) {
    throw UserError(path + " is not a 64-bit ELF shared object");
  }
  Elf64_Ehdr eh;
  std::memcpy(&eh, data.data(), sizeof(eh));
  if (eh.e_machine != kThisMachine) {
    throw UserError(path + " was built for another architecture (ELF machine " +
                    std::to_string(eh.e_machine) + "); this runner is " + kThisArch);
  }
  uint64_t size = data.size();
  if (eh.e_phoff + uint64_t(eh.e_phnum) * eh.e_phentsize > size ||
      eh.e_shoff + uint64_t(eh.e_shnum) * eh.e_shentsize > size) {
    throw UserError(path + " is truncated or damaged");
  }
  for (int i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph;
    std::memcpy(&ph, data.data() + eh.e_phoff + uint64_t(i) * eh.e_phentsize, sizeof(ph));
    if (ph.p_type == PT_LOAD && ph.p_offset + ph.p_filesz > size) {
      throw UserError(path + " is truncated or damaged");
    }
  }
}

// ---------------------------------------------------------------- .npy

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes ? bytes : 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// numpy's dtype name <-> .npy descr <-> DLPack type, for the dtypes models take.
struct DType {
  const char* name;
  const char* descr;
  DLDataType dl;
};
constexpr DType kDTypes[] = {
    {"float32", "<f4", {kDLFloat, 32, 1}}, {"float16", "<f2", {kDLFloat, 16, 1}},
    {"float64", "<f8", {kDLFloat, 64, 1}}, {"int64", "<i8", {kDLInt, 64, 1}},
    {"int32", "<i4", {kDLInt, 32, 1}},     {"int8", "|i1", {kDLInt, 8, 1}},
    {"uint8", "|u1", {kDLUInt, 8, 1}},     {"bool", "|b1", {kDLBool, 8, 1}},
};

const DType& ByName(const std::string& name) {
  for (const DType& d : kDTypes) {
    if (name == d.name) return d;
  }
  throw UserError("the dtype " + name + " is not one the runner reads");
}

const DType* ByDL(DLDataType t) {
  for (const DType& d : kDTypes) {
    if (d.dl.code == t.code && d.dl.bits == t.bits && d.dl.lanes == t.lanes) return &d;
  }
  return nullptr;
}

struct Npy {
  std::string descr;
  std::vector<int64_t> shape;
  std::string bytes;
};

Npy ReadNpy(const std::string& path) {
  std::string data = ReadFile(path);
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY") != 0) {
    throw UserError(path + " is not a .npy file");
  }
  size_t header_len, offset;
  if (data[6] == 1) {
    header_len = uint8_t(data[8]) | (uint8_t(data[9]) << 8);
    offset = 10;
  } else {
    if (data.size() < 12) throw UserError(path + " is not a .npy file");
    header_len = uint8_t(data[8]) | (uint8_t(data[9]) << 8) | (uint8_t(data[10]) << 16) |
                 (size_t(uint8_t(data[11])) << 24);
    offset = 12;
  }
  if (offset + header_len > data.size()) throw UserError(path + " is truncated");
  std::string header = data.substr(offset, header_len);
  if (header.find("'fortran_order': True") != std::string::npos) {
    throw UserError(path + " is in Fortran order; save it C-contiguous");
  }
  Npy npy;
  size_t d = header.find("'descr'");
  size_t q1 = d == std::string::npos ? d : header.find('\'', header.find(':', d));
  size_t q2 = q1 == std::string::npos ? q1 : header.find('\'', q1 + 1);
  size_t open = header.find('(', header.find("'shape'"));
  size_t close = open == std::string::npos ? open : header.find(')', open);
  if (q2 == std::string::npos || close == std::string::npos) {
    throw UserError(path + " has a damaged .npy header");
  }
  npy.descr = header.substr(q1 + 1, q2 - q1 - 1);
  std::stringstream dims(header.substr(open + 1, close - open - 1));
  std::string item;
  while (std::getline(dims, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    try {
      npy.shape.push_back(std::stoll(item));
    } catch (const std::exception&) {
      throw UserError(path + " has a damaged .npy header");
    }
  }
  npy.bytes = data.substr(offset + header_len);
  return npy;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// A tensor of the dtype and shape the build takes (`what`: the model's input, a weight).
ffi::Tensor CheckedTensor(const Npy& npy, const std::string& dtype,
                          const std::vector<int64_t>& shape, const std::string& path,
                          const std::string& what) {
  const DType& want = ByName(dtype);
  if (npy.descr != want.descr) {
    throw UserError(path + " holds " + npy.descr + " data; " + what + " is " + want.name +
                    " ('" + want.descr + "')");
  }
  if (npy.shape != shape) {
    throw UserError(path + " has shape " + ShapeText(npy.shape) + "; " + what + " is " +
                    ShapeText(shape));
  }
  int64_t count = 1;
  for (int64_t v : npy.shape) count *= v;
  if (npy.bytes.size() != size_t(count) * (want.dl.bits / 8)) throw UserError(path + " is truncated");
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(npy.shape.data(), npy.shape.size()),
                                           want.dl, DLDevice{kDLCPU, 0});
  std::memcpy(t.data_ptr(), npy.bytes.data(), npy.bytes.size());
  return t;
}

// ---------------------------------------------------------------- params.bin

// A file read in order, every byte hashed, never past its end.
class HashedFile {
 public:
  HashedFile(const std::string& path) : path_(path) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) throw UserError("cannot read " + path + ": not found");
    if (!S_ISREG(st.st_mode)) throw UserError(path + " is not a regular file");
    f_ = std::fopen(path.c_str(), "rb");
    if (f_ == nullptr) throw UserError("cannot read " + path);
    left_ = uint64_t(st.st_size);
  }
  ~HashedFile() { std::fclose(f_); }

  UserError Damaged(const std::string& why) const {
    return UserError(path_ + " is damaged or not a weights file (" + why + ")");
  }
  void Read(void* out, uint64_t n) {
    if (n > left_) throw Damaged("it ends early");
    char* p = static_cast<char*>(out);
    for (uint64_t done = 0; done < n;) {  // in chunks: hashed while in cache
      size_t take = size_t(std::min<uint64_t>(n - done, 1 << 20));
      if (std::fread(p + done, 1, take, f_) != take) throw Damaged("it ends early");
      sha_.Update(p + done, take);
      done += take;
    }
    left_ -= n;
  }
  template <typename T>
  T Get() {
    T v;
    Read(&v, sizeof(v));
    return v;
  }
  uint64_t left() const { return left_; }
  std::string Hex() { return sha_.Hex(); }

 private:
  std::string path_;
  std::FILE* f_;
  uint64_t left_;
  Sha256 sha_;
};

// params.bin (TVM's parameter-list format) read straight into aligned tensors, hashing as
// it goes: no copy of the file in memory (TVM's runtime.LoadParams takes it as one blob
// and copies it on the way). Refused unless its SHA-256 is `sha`.
std::vector<std::pair<std::string, ffi::Tensor>> ReadParams(const std::string& path,
                                                            const std::string& sha) {
  constexpr uint64_t kListMagic = 0xF7E58D4F05049CB7, kTensorMagic = 0xDD5E40F096B4A13F;
  HashedFile f(path);
  if (f.Get<uint64_t>() != kListMagic) throw f.Damaged("no parameter-list header");
  f.Get<uint64_t>();
  uint64_t count = f.Get<uint64_t>();
  if (count > f.left()) throw f.Damaged("it ends early");
  std::vector<std::string> names;
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t len = f.Get<uint64_t>();
    if (len > f.left()) throw f.Damaged("it ends early");
    std::string name(len, '\0');
    f.Read(name.data(), len);
    names.push_back(name);
  }
  if (f.Get<uint64_t>() != count) throw f.Damaged("names and tensors differ in number");
  std::vector<std::pair<std::string, ffi::Tensor>> out;
  for (const std::string& name : names) {
    uint64_t magic = f.Get<uint64_t>();
    f.Get<uint64_t>();
    DLDevice device = f.Get<DLDevice>();
    int32_t ndim = f.Get<int32_t>();
    DLDataType dtype = f.Get<DLDataType>();
    if (magic != kTensorMagic || device.device_type != kDLCPU || ndim < 0 || ndim > 32) {
      throw f.Damaged("tensor " + name + " has a bad header");
    }
    if (ByDL(dtype) == nullptr) throw f.Damaged("tensor " + name + " has an unsupported type");
    std::vector<int64_t> shape(ndim);
    uint64_t elements = 1;
    for (int64_t& d : shape) {
      d = f.Get<int64_t>();
      if (d < 0 || (d > 0 && elements > f.left() / uint64_t(d))) {
        throw f.Damaged("tensor " + name + " has a bad size");
      }
      elements *= uint64_t(d);
    }
    int64_t nbytes = f.Get<int64_t>();
    if (nbytes < 0 || uint64_t(nbytes) != elements * (dtype.bits / 8) ||
        uint64_t(nbytes) > f.left()) {
      throw f.Damaged("tensor " + name + " has a bad size");
    }
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                             dtype, DLDevice{kDLCPU, 0});
    f.Read(t.data_ptr(), uint64_t(nbytes));
    out.emplace_back(name, t);
  }
  if (f.left() != 0) throw f.Damaged("it has bytes after its last tensor");
  if (f.Hex() != sha) {
    throw UserError(path + " is damaged or was changed after the build (SHA-256 differs from "
                    "the manifest)");
  }
  return out;
}

// Writes `t` (on the CPU) as .npy at `path`, through a unique temporary file beside it.
void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  const DType* d = ByDL(t.dtype());
  if (d == nullptr) throw UserError("an output has a dtype the runner cannot write");
  std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
  int64_t count = 1;
  for (int64_t v : shape) count *= v;
  std::string header = std::string("{'descr': '") + d->descr +
                       "', 'fortran_order': False, 'shape': " + ShapeText(shape) + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::string tmpl = path + ".XXXXXX";
  std::vector<char> name(tmpl.begin(), tmpl.end());
  name.push_back('\0');
  int fd = mkstemp(name.data());
  if (fd < 0) throw UserError("cannot write " + path);
  std::string tmp(name.data());
  std::string out = std::string("\x93NUMPY\x01\x00", 8);
  uint16_t len = uint16_t(header.size());
  out.append(reinterpret_cast<const char*>(&len), 2);
  out += header;
  out.append(static_cast<const char*>(t.data_ptr()), size_t(count) * (d->dl.bits / 8));
  bool ok = write(fd, out.data(), out.size()) == ssize_t(out.size());
  ok = fchmod(fd, 0644) == 0 && ok;
  ok = close(fd) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    unlink(tmp.c_str());
    throw UserError("cannot write " + path);
  }
}

// An output location that can be written: not a folder, in a folder that exists.
void CheckWritable(const std::string& path, bool folder) {
  struct stat st;
  if (folder) {
    if (stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      throw UserError("--outputs " + path + " is not a folder");
    }
    return;
  }
  if (stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    throw UserError("--output " + path + " exists and is not a regular file");
  }
  std::string parent = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
  if (parent.empty()) parent = "/";
  if (stat(parent.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw UserError("--output " + path + ": folder " + parent + " does not exist");
  }
}

std::string FirstLine(const std::string& s) { return s.substr(0, s.find('\n')); }

// ---------------------------------------------------------------- devices

// TVM's CUDA device API lives in its own library; load it next to libtvm_runtime.so.
void LoadCudaRuntime() {
  Dl_info info;
  std::string lib = "libtvm_runtime_cuda.so";
  void* any = dlsym(RTLD_DEFAULT, "TVMFFIEnvGetStream");
  if (any != nullptr && dladdr(any, &info) != 0 && info.dli_fname != nullptr) {
    std::string runtime = info.dli_fname;
    std::string dir = runtime.substr(0, runtime.rfind('/') + 1);
    if (std::ifstream(dir + lib)) lib = dir + lib;
    // A bundle carries the CUDA runtime library beside it; load that one first.
    if (std::ifstream(dir + "libcudart.so.13")) {
      dlopen((dir + "libcudart.so.13").c_str(), RTLD_NOW | RTLD_GLOBAL);
    }
  }
  if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    throw UserError(std::string("this build runs on CUDA, but TVM's CUDA runtime cannot load: ") +
                    (why ? why : lib));
  }
}

// A copy of `t` on `dev` (TVM's own allocator and copy, any device pair).
ffi::Tensor CopyTo(const ffi::Tensor& t, DLDevice dev) {
  static ffi::Function empty = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope");
  static ffi::Function copy = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromTo");
  ffi::Tensor out = empty(ffi::Shape(t.shape().begin(), t.shape().end()), t.dtype(), dev,
                          ffi::Optional<ffi::String>())
                        .cast<ffi::Tensor>();
  copy(t, out);
  return out;
}

// TVM's thread pool halves hardware_concurrency() on x86 (it assumes hyper-threading)
// and pins threads to cores; give it every core this process may use, unpinned (as the
// Python loader does), unless the user chose.
void ConfigureThreads() {
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) {
    setenv("TVM_NUM_THREADS", std::to_string(CPU_COUNT(&cpus)).c_str(), /*overwrite=*/0);
  }
  setenv("TVM_BIND_THREADS", "0", /*overwrite=*/0);
}

// main's weights made from raw weights (DIR/0000.npy...) by the build's weight transform:
// each stage a CPU module whose main_transform_params maps a tuple of weights to the next.
std::vector<ffi::Tensor> TransformedWeights(const std::string& dir, const Manifest& m,
                                            const std::string& raw_dir) {
  if (m.transform.empty()) {
    throw UserError(dir + " keeps no weight transform (built by an earlier xcompile); "
                    "rebuild it to load raw weights");
  }
  ffi::Array<ffi::Any> weights;
  for (size_t i = 0; i < m.raw.size(); ++i) {
    char name[16];
    std::snprintf(name, sizeof(name), "%04zu.npy", i);
    std::string path = raw_dir + "/" + name;
    weights.push_back(CheckedTensor(ReadNpy(path), m.raw[i].dtype, m.raw[i].shape, path,
                                    "the build's weight " + m.raw[i].name));
  }
  constexpr int kPooledAllocator = 2;
  for (const auto& [file, sha] : m.transform) {
    std::string path = dir + "/" + file;
    CheckSharedObject(path, ReadChecked(dir, file, sha));
    ffi::Module lib = ffi::Module::LoadFromFile(path);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(int(kDLCPU), 0, kPooledAllocator);
    weights = vm->GetFunction("main_transform_params").value()(weights).cast<ffi::Array<ffi::Any>>();
  }
  std::vector<ffi::Tensor> out;
  for (const ffi::Any& w : weights) out.push_back(w.cast<ffi::Tensor>());
  if (out.size() != m.weight_names.size()) {
    throw UserError(dir + "'s weight transform makes " + std::to_string(out.size()) +
                    " weights; its module takes " + std::to_string(m.weight_names.size()));
  }
  return out;
}

int64_t ParseRepeat(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || v < 1 || v > kMaxRepeat) {
    throw UserError("--repeat takes a whole number from 1 to " + std::to_string(kMaxRepeat) +
                    ", got " + text);
  }
  return v;
}

int Run(int argc, char** argv) {
  std::string dir, input, output, outputs, raw_dir;
  int64_t repeat = 1;
  bool serve = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UserError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--input") input = value();
    else if (a == "--output") output = value();
    else if (a == "--outputs") outputs = value();
    else if (a == "--repeat") repeat = ParseRepeat(value());
    else if (a == "--raw-weights") raw_dir = value();
    else if (a == "--serve") serve = true;
    else if (dir.empty() && a.rfind("--", 0) != 0) dir = a;
    else throw UserError("unknown argument " + a);
  }
  if (dir.empty() || input.empty()) {
    throw UserError("usage: xcompile_run BUILD_DIR --input X.npy [--output Y.npy] "
                    "[--outputs DIR] [--repeat N] [--raw-weights DIR] [--serve]");
  }
  Manifest m = ReadManifest(dir);
  if (!output.empty()) CheckWritable(output, false);
  if (!outputs.empty()) CheckWritable(outputs, true);
  // Both files checked before either is used: the module is never opened unverified.
  std::string module_path = dir + "/" + m.module;
  std::string so = ReadChecked(dir, m.module, m.module_sha);
  CheckSharedObject(module_path, so);
  so.clear();
  std::vector<std::pair<std::string, ffi::Tensor>> params;
  if (raw_dir.empty()) {
    struct stat st;
    if (stat((dir + "/" + m.params).c_str(), &st) != 0) {
      throw UserError(dir + " is incomplete: " + m.params + " is missing");
    }
    params = ReadParams(dir + "/" + m.params, m.params_sha);
  }
  Npy x = ReadNpy(input);
  ffi::Tensor x_cpu = CheckedTensor(x, m.input_dtype, m.input_shape, input, "the model's input");
  x.bytes.clear();
  ConfigureThreads();

  bool cuda = m.device == "cuda";
  if (cuda) LoadCudaRuntime();
  DLDevice dev = cuda ? DLDevice{kDLCUDA, 0} : DLDevice{kDLCPU, 0};

  ffi::Module lib = ffi::Module::LoadFromFile(module_path);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  constexpr int kPooledAllocator = 2;
  if (cuda) {  // the GPU, and the CPU as the host device
    vm->GetFunction("vm_initialization").value()(int(kDLCUDA), 0, kPooledAllocator,
                                                   int(kDLCPU), 0, kPooledAllocator);
  } else {
    vm->GetFunction("vm_initialization").value()(int(kDLCPU), 0, kPooledAllocator);
  }
  std::vector<ffi::Tensor> weights;  // main's, in its order
  if (raw_dir.empty()) {
    for (const std::string& name : m.weight_names) {  // main's order, from the manifest
      auto it = std::find_if(params.begin(), params.end(),
                             [&](const auto& p) { return p.first == name; });
      if (it == params.end()) throw UserError(dir + "/" + m.params + " lacks the weight " + name);
      weights.push_back(it->second);
    }
    params.clear();
  } else {
    weights = TransformedWeights(dir, m, raw_dir);
  }

  std::vector<ffi::Any> args;
  args.push_back(cuda ? CopyTo(x_cpu, dev) : x_cpu);
  for (const ffi::Tensor& w : weights) args.push_back(cuda ? CopyTo(w, dev) : w);
  weights.clear();
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Function main_fn = vm->GetFunction("main").value();

  ffi::Any result;
  std::vector<double> ms;
  // Kernels run asynchronously on a GPU: time up to the copy-back that waits for them.
  auto results = [&]() {
    std::vector<ffi::Tensor> out;
    if (auto t = result.try_cast<ffi::Tensor>()) {
      out.push_back(*t);
    } else {
      for (const ffi::Any& v : result.cast<ffi::Array<ffi::Any>>()) out.push_back(v.cast<ffi::Tensor>());
    }
    for (ffi::Tensor& t : out) {
      if (cuda) t = CopyTo(t, DLDevice{kDLCPU, 0});
    }
    return out;
  };
  std::vector<ffi::Tensor> out;
  auto time_runs = [&](int64_t n) {
    ms.clear();
    for (int64_t r = 0; r < n; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      main_fn.CallPacked(views.data(), int32_t(views.size()), &result);
      out = results();
      ms.push_back(std::chrono::duration<double, std::milli>(
                       std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
  };
  time_runs(repeat);
  if (!output.empty()) WriteNpy(output, out[0]);
  if (!outputs.empty()) {
    for (size_t i = 0; i < out.size(); ++i) WriteNpy(outputs + "/" + std::to_string(i) + ".npy", out[i]);
  }
  std::cout << "latency: median " << ms[ms.size() / 2] << " ms, min " << ms.front()
            << " ms over " << repeat << " runs" << std::endl;
  if (serve) {
    // Loaded once, timed on request: "run N" on stdin answers "ms MEDIAN MIN" (how a
    // benchmark interleaves this process with other backends' rounds); EOF or "quit" ends.
    std::string line;
    while (std::getline(std::cin, line)) {
      if (line == "quit") break;
      if (line.rfind("run ", 0) != 0) throw UserError("--serve takes 'run N' or 'quit', got " + line);
      time_runs(ParseRepeat(line.substr(4)));
      std::cout << "ms " << ms[ms.size() / 2] << " " << ms.front() << std::endl;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const UserError& e) {
    std::cerr << "error: " << e.what() << std::endl;
  } catch (const ffi::Error& e) {
    std::cerr << "error: " << FirstLine(e.kind() + ": " + e.message()) << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << FirstLine(e.what()) << std::endl;
  }
  return 2;
}
