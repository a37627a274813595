// CPU implementations of the fastnoise_cpu ops (schemas in ../noise.cpp): argument checks, the
// output, the rows of the GEMM view spread over threads in blocks taken as threads come free,
// and the choice of kernel copy (AVX-512 or AVX2 when the CPU has it, else the baseline). Each
// element is a pure function of (seed, offset, stream, row, column), so the result does not
// depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "ops_common.h"

namespace fastnoise_cpu {

float radius_table[65536];

void init_tables() {
  static std::once_flag once;
  std::call_once(once, [] {
    for (int i = 0; i < 65536; ++i) {
      radius_table[i] = static_cast<float>(std::sqrt(-2.0 * std::log((i + 0.5) / 65536.0)));
    }
  });
}

namespace {

constexpr int64_t kModeTensor = 0, kModeRow = 1, kModeProportional = 2;  // fastnoise.spec

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && kernels_avx2.name;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && kernels_avx512.name;
#else
  return false;
#endif
}

// AMD Zen 1 (family 17h, models 00h-2Fh) splits each 256-bit operation in two 128-bit halves;
// there the AVX2 copy measured slower than the SSE2 one and erratic when the core's other
// hardware thread is busy (csrc/README.md), so it keeps the baseline
bool avx2_is_slow() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  return __builtin_cpu_is("znver1");
#else
  return false;
#endif
}

const Kernels* default_kernels() {
  const char* env = std::getenv("FASTNOISE_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "baseline") == 0) return &kernels_baseline;
  if (env != nullptr && std::strcmp(env, "avx2") == 0 && cpu_has_avx2()) return &kernels_avx2;
  if (env != nullptr && std::strcmp(env, "avx512") == 0 && cpu_has_avx512()) return &kernels_avx512;
  // AVX-512: 2.4x the AVX2 copy's rate on an Intel Xeon (Sapphire Rapids), same bits (csrc/README.md)
  if (cpu_has_avx512()) return &kernels_avx512;
  return cpu_has_avx2() && !avx2_is_slow() ? &kernels_avx2 : &kernels_baseline;
}

std::atomic<const Kernels*> g_kernels{nullptr};

DType to_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default:
      TORCH_CHECK(false, "fastnoise_cpu: ", what, " must be float32, bfloat16 or float16, got ", t);
  }
}

// Element offsets, from a row's start, of canonical columns 0..K-1 of `t` seen as [size(0), K];
// empty when a row is contiguous in that order (the kernels' fast path).
std::vector<int64_t> column_offsets(const at::Tensor& t) {
  const int64_t d = t.dim();
  bool contiguous = true;
  int64_t expected = 1;
  for (int64_t i = d - 1; i >= 1; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) contiguous = false;
    expected *= t.size(i);
  }
  if (contiguous) return {};
  int64_t k = 1;
  for (int64_t i = 1; i < d; ++i) k *= t.size(i);
  std::vector<int64_t> off(static_cast<size_t>(k));
  std::vector<int64_t> idx(static_cast<size_t>(d), 0);
  int64_t pos = 0;
  for (int64_t c = 0; c < k; ++c) {
    off[static_cast<size_t>(c)] = pos;
    for (int64_t i = d - 1; i >= 1; --i) {  // next canonical index, last dimension fastest
      pos += t.stride(i);
      if (++idx[static_cast<size_t>(i)] < t.size(i)) break;
      pos -= t.stride(i) * t.size(i);
      idx[static_cast<size_t>(i)] = 0;
    }
  }
  return off;
}

at::Tensor checked_sigma(const at::Tensor& sigma, int64_t mode, int64_t channels) {
  TORCH_CHECK(sigma.device().is_cpu(), "fastnoise_cpu: sigma must be a CPU tensor, got ", sigma.device());
  TORCH_CHECK(mode == kModeTensor || mode == kModeRow || mode == kModeProportional,
              "fastnoise_cpu: unknown noise mode ", mode);
  const int64_t want = mode == kModeRow ? channels : 1;
  TORCH_CHECK(sigma.numel() == want, "fastnoise_cpu: mode ", mode, " needs ", want,
              " sigma value(s), got ", sigma.numel());
  return sigma.to(at::kFloat).contiguous();
}

Scale scale_of(int64_t mode, bool bias) {
  if (mode == kModeProportional) return Scale::Proportional;
  if (mode == kModeRow && bias) return Scale::PerColumn;
  return Scale::Scalar;
}

// out = t + sigma z for t seen as rows x cols (a bias: one row of its length, stream 1)
at::Tensor noisy(const at::Tensor& t, const at::Tensor& sigma, int64_t mode, int64_t seed,
                 int64_t offset, at::ScalarType dtype, bool bias) {
  TORCH_CHECK(t.device().is_cpu(), "fastnoise_cpu: expected a CPU tensor, got ", t.device());
  if (bias) {
    TORCH_CHECK(t.dim() == 1, "fastnoise_cpu.noisy_bias: bias must be 1-D, got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() >= 1, "fastnoise_cpu.noisy_weight: weight must have a dimension");
  }
  const DType in_type = to_dtype(t.scalar_type(), "the weight");
  const DType out_type = to_dtype(dtype, "dtype");
  at::Tensor out = at::empty_like(t, t.options().dtype(dtype));
  const int64_t rows = bias ? 1 : t.size(0);
  const int64_t cols = rows == 0 ? 0 : t.numel() / rows;
  const at::Tensor sig = checked_sigma(sigma, mode, bias ? t.numel() : rows);
  if (t.numel() == 0) return out;
  const Stream st = make_stream(seed, offset, bias ? 1u : 0u);
  const Kernels& k = kernels();
  const Scale scale = scale_of(mode, bias);
  const float* sig_ptr = sig.data_ptr<float>();
  // a bias is one row whose columns are its elements: offsets from its stride
  std::vector<int64_t> in_off, out_off;
  if (bias) {
    if (t.stride(0) != 1) {
      in_off.resize(static_cast<size_t>(cols));
      for (int64_t c = 0; c < cols; ++c) in_off[static_cast<size_t>(c)] = c * t.stride(0);
    }
  } else {
    in_off = column_offsets(t);
    out_off = column_offsets(out);
  }
  // strided rows go through offset tables: both or neither
  if (in_off.empty() != out_off.empty()) {
    std::vector<int64_t>& missing = in_off.empty() ? in_off : out_off;
    missing.resize(static_cast<size_t>(cols));
    for (int64_t c = 0; c < cols; ++c) missing[static_cast<size_t>(c)] = c;
  }
  const int64_t in_row = bias ? 0 : t.stride(0), out_row = bias ? 0 : out.stride(0);
  const int64_t in_size = t.element_size(), out_size = out.element_size();
  const char* in_base = static_cast<const char*>(t.const_data_ptr());
  char* out_base = static_cast<char*>(out.data_ptr());
  for_row_blocks(rows, cols, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      Row row;
      row.row = static_cast<uint32_t>(r);
      row.cols = cols;
      row.in_type = in_type;
      row.in = in_base + r * in_row * in_size;
      row.in_off = in_off.empty() ? nullptr : in_off.data();
      row.out_type = out_type;
      row.out = out_base + r * out_row * out_size;
      row.out_off = out_off.empty() ? nullptr : out_off.data();
      row.scale = scale;
      row.sigma = (scale == Scale::Scalar && mode == kModeRow) ? sig_ptr[r] : sig_ptr[0];
      row.sigma_col = scale == Scale::PerColumn ? sig_ptr : nullptr;
      k.noisy_row(st, row);
    }
  });
  return out;
}

at::Tensor noisy_weight(const at::Tensor& weight, const at::Tensor& sigma, int64_t mode, int64_t seed,
                        int64_t offset, at::ScalarType dtype) {
  return noisy(weight, sigma, mode, seed, offset, dtype, false);
}

at::Tensor noisy_bias(const at::Tensor& bias, const at::Tensor& sigma, int64_t mode, int64_t seed,
                      int64_t offset, at::ScalarType dtype) {
  return noisy(bias, sigma, mode, seed, offset, dtype, true);
}

at::Tensor normal_grid(int64_t seed, int64_t offset, int64_t rows, int64_t cols, int64_t stream) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "fastnoise_cpu.normal_grid: rows and cols must be >= 0");
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const Stream st = make_stream(seed, offset, static_cast<uint32_t>(stream));
  const Kernels& k = kernels();
  float* base = out.data_ptr<float>();
  for_row_blocks(rows, cols, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) k.normal_row(st, static_cast<uint32_t>(r), cols, base + r * cols);
  });
  return out;
}

at::Tensor philox_words(int64_t seed, int64_t offset, int64_t stream, int64_t rows, int64_t groups) {
  TORCH_CHECK(rows >= 0 && groups >= 0, "fastnoise_cpu.philox_words: rows and groups must be >= 0");
  const Stream st = make_stream(seed, offset, static_cast<uint32_t>(stream));
  const Kernels& k = kernels();
  std::vector<uint32_t> words(static_cast<size_t>(rows * groups * 4));
  for (int64_t r = 0; r < rows; ++r) {
    k.philox_words(st, static_cast<uint32_t>(r), 0, groups, words.data() + r * groups * 4);
  }
  at::Tensor out = at::empty({rows, groups, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t i = 0; i < words.size(); ++i) o[i] = static_cast<int64_t>(words[i]);
  return out;
}

std::string kernel_isa() { return kernels().name; }

std::string set_kernel_isa(const std::string& isa) {
  const std::string previous = kernel_isa();
  if (isa == "baseline") {
    g_kernels.store(&kernels_baseline);
  } else if (isa == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "fastnoise_cpu.set_kernel_isa: this CPU has no AVX2 + FMA");
    g_kernels.store(&kernels_avx2);
  } else if (isa == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "fastnoise_cpu.set_kernel_isa: this CPU has no AVX-512 F/BW/VL/DQ");
    g_kernels.store(&kernels_avx512);
  } else if (isa == "auto") {
    g_kernels.store(default_kernels());
  } else {
    TORCH_CHECK(false, "fastnoise_cpu.set_kernel_isa: isa must be 'baseline', 'avx2', 'avx512' or 'auto', got '",
                isa, "'");
  }
  return previous;
}

}  // namespace

const Kernels& kernels() {
  const Kernels* k = g_kernels.load();
  if (k == nullptr) {
    k = default_kernels();
    g_kernels.store(k);
  }
  init_tables();
  return *k;
}

Stream make_stream(int64_t seed, int64_t offset, uint32_t stream) {
  TORCH_CHECK(seed >= 0, "fastnoise_cpu: seed must be in [0, 2**63), got ", seed);
  return Stream{static_cast<uint32_t>(seed & 0xFFFFFFFF), static_cast<uint32_t>(seed >> 32), stream,
                static_cast<uint32_t>(offset & 0xFFFFFFFF)};
}

}  // namespace fastnoise_cpu

TORCH_LIBRARY_IMPL(fastnoise_cpu, CPU, m) {
  m.impl("noisy_weight", fastnoise_cpu::noisy_weight);
  m.impl("noisy_bias", fastnoise_cpu::noisy_bias);
}

// ops without tensor arguments dispatch on no key: registered for every backend
TORCH_LIBRARY_IMPL(fastnoise_cpu, CompositeExplicitAutograd, m) {
  m.impl("normal_grid", fastnoise_cpu::normal_grid);
  m.impl("philox_words", fastnoise_cpu::philox_words);
  m.impl("kernel_isa", fastnoise_cpu::kernel_isa);
  m.impl("set_kernel_isa", fastnoise_cpu::set_kernel_isa);
}
