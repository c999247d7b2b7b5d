// xcompile_run: run an xcompile build folder with nothing but the TVM runtime.
//
//   xcompile_run BUILD_DIR --input X.npy --output Y.npy [--repeat N]
//
// Loads BUILD_DIR/module.so (a Relax VM executable) and BUILD_DIR/params.bin (weights in
// TVM's parameter format, named so that sorting the names gives the call order), runs
// `main(input, *weights)` on the build's device (the CPU, or CUDA GPU 0 when the manifest
// says "device": "cuda"), writes the first output as .npy and prints the median latency.
// Links libtvm_runtime and libtvm_ffi only; a CUDA build loads libtvm_runtime_cuda.so
// (and through it the CUDA runtime and driver) at run time. Every failure is one
// `error: ...` line on stderr and exit status 2.
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <elf.h>
#include <sched.h>
#include <fstream>
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

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UserError("cannot read " + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

#if defined(__aarch64__)
constexpr uint16_t kThisMachine = EM_AARCH64;
constexpr const char* kThisArch = "aarch64";
#else
constexpr uint16_t kThisMachine = EM_X86_64;
constexpr const char* kThisArch = "x86_64";
#endif

// dlopen of a truncated shared object can kill the process with SIGBUS, so check the
// headers against the file size (and the architecture) first.
void CheckSharedObject(const std::string& path) {
  std::string data = ReadFile(path);
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

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes ? bytes : 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// A float32, C-order .npy array.
struct Npy {
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
    header_len = uint8_t(data[8]) | (uint8_t(data[9]) << 8) | (uint8_t(data[10]) << 16) |
                 (size_t(uint8_t(data[11])) << 24);
    offset = 12;
  }
  std::string header = data.substr(offset, header_len);
  if (header.find("'descr': '<f4'") == std::string::npos) {
    throw UserError(path + " must hold float32 data (little-endian '<f4')");
  }
  if (header.find("'fortran_order': True") != std::string::npos) {
    throw UserError(path + " is in Fortran order; save it C-contiguous");
  }
  Npy npy;
  size_t open = header.find('(', header.find("'shape'"));
  size_t close = header.find(')', open);
  std::stringstream dims(header.substr(open + 1, close - open - 1));
  std::string item;
  int64_t count = 1;
  while (std::getline(dims, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    npy.shape.push_back(std::stoll(item));
    count *= npy.shape.back();
  }
  npy.bytes = data.substr(offset + header_len);
  if (npy.bytes.size() != size_t(count) * 4) throw UserError(path + " is truncated");
  return npy;
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  if (t.dtype().code != kDLFloat || t.dtype().bits != 32) {
    throw UserError("the output is not float32");
  }
  std::string shape = "(";
  int64_t count = 1;
  for (int64_t d : t.shape()) {
    shape += std::to_string(d) + ", ";
    count *= d;
  }
  if (t.shape().size() > 1) shape.erase(shape.size() - 1);
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw UserError("cannot write " + path);
    f.write("\x93NUMPY\x01\x00", 8);
    uint16_t len = uint16_t(header.size());
    f.write(reinterpret_cast<const char*>(&len), 2);
    f << header;
    f.write(static_cast<const char*>(t.data_ptr()), count * 4);
    if (!f) throw UserError("cannot write " + path);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw UserError("cannot write " + path);
}

ffi::Tensor ToTensor(const Npy& npy) {
  DLDataType f32{kDLFloat, 32, 1};
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(npy.shape.data(), npy.shape.size()), f32,
                                           DLDevice{kDLCPU, 0});
  std::memcpy(t.data_ptr(), npy.bytes.data(), npy.bytes.size());
  return t;
}

std::string FirstLine(const std::string& s) { return s.substr(0, s.find('\n')); }

// The build's device, from its manifest (written by xcompile, so a plain search will do).
bool IsCudaBuild(const std::string& dir) {
  std::ifstream f(dir + "/manifest.json");
  if (!f) return false;
  std::ostringstream s;
  s << f.rdbuf();
  return s.str().find("\"device\": \"cuda\"") != std::string::npos;
}

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

// TVM's thread pool halves hardware_concurrency() on x86 (it assumes hyper-threading);
// give it every core this process may use, unless the user chose a number.
void ConfigureThreads() {
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) {
    setenv("TVM_NUM_THREADS", std::to_string(CPU_COUNT(&cpus)).c_str(), /*overwrite=*/0);
  }
}

int Run(int argc, char** argv) {
  std::string dir, input, output;
  int repeat = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UserError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--input") input = value();
    else if (a == "--output") output = value();
    else if (a == "--repeat") repeat = std::max(1, std::atoi(value().c_str()));
    else if (dir.empty() && a.rfind("--", 0) != 0) dir = a;
    else throw UserError("unknown argument " + a);
  }
  if (dir.empty() || input.empty()) {
    throw UserError("usage: xcompile_run BUILD_DIR --input X.npy [--output Y.npy] [--repeat N]");
  }
  std::string module_path = dir + "/module.so", params_path = dir + "/params.bin";
  if (!std::ifstream(module_path)) throw UserError(dir + " has no module.so");
  if (!std::ifstream(params_path)) throw UserError(dir + " is incomplete: params.bin is missing");
  CheckSharedObject(module_path);
  Npy x = ReadNpy(input);
  ConfigureThreads();

  bool cuda = IsCudaBuild(dir);
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
  ffi::Function load_params = ffi::Function::GetGlobalRequired("runtime.LoadParams");
  std::string blob = ReadFile(params_path);
  auto params = load_params(ffi::Bytes(blob.data(), blob.size()))
                    .cast<ffi::Map<ffi::String, ffi::Tensor>>();
  std::vector<std::string> names;
  for (const auto& kv : params) names.push_back(std::string(kv.first));
  std::sort(names.begin(), names.end());

  std::vector<ffi::Any> args;
  args.push_back(cuda ? CopyTo(ToTensor(x), dev) : ToTensor(x));
  for (const auto& name : names) {
    ffi::Tensor w = params.at(ffi::String(name));
    args.push_back(cuda ? CopyTo(w, dev) : w);
  }
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Function main_fn = vm->GetFunction("main").value();

  ffi::Any result;
  std::vector<double> ms;
  // Kernels run asynchronously on a GPU: time up to the copy-back that waits for them.
  auto first_output = [&]() {
    ffi::Tensor t = result.as<ffi::Tensor>().has_value()
                        ? result.cast<ffi::Tensor>()
                        : result.cast<ffi::Array<ffi::Any>>()[0].cast<ffi::Tensor>();
    return cuda ? CopyTo(t, DLDevice{kDLCPU, 0}) : t;
  };
  ffi::Tensor out;
  for (int r = 0; r < repeat; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    main_fn.CallPacked(views.data(), int32_t(views.size()), &result);
    out = first_output();
    ms.push_back(std::chrono::duration<double, std::milli>(
                     std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  if (!output.empty()) WriteNpy(output, out);
  std::cout << "latency: median " << ms[ms.size() / 2] << " ms, min " << ms.front()
            << " ms over " << repeat << " runs" << std::endl;
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
