// The interface between the torch-facing CPU op (noise_cpu.cpp) and the noise kernels, which are
// compiled once per instruction set (noise_kernel_base.cpp, noise_kernel_avx2.cpp) from the same
// source (noise_kernel.h). Plain C++ only: the kernel files must not instantiate torch or std
// inline code under their own target flags (the linker could keep an AVX2 copy of it for callers
// on any CPU).
#pragma once

#include <cstdint>

namespace fastnoise_cpu {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// how sigma reaches element (r, c) of a row
enum class Scale : int {
  Scalar = 0,        // one sigma for the row (MODE_TENSOR, or MODE_ROW's sigma[r])
  PerColumn = 1,     // sigma_col[c] (a bias under MODE_ROW: each element has its channel's sigma)
  Proportional = 2,  // sigma * |w[c]| (MODE_PROPORTIONAL; sigma holds eta)
};

// Philox key and the two counter words that are the same for a whole tensor.
struct Stream {
  uint32_t k0, k1;   // seed & 0xFFFFFFFF, seed >> 32
  uint32_t stream;   // 0: weight, 1: bias
  uint32_t offset;   // the call counter
};

// One row of the GEMM view: the element of canonical column c sits at in[in_off[c]] and goes to
// out[out_off[c]] (element offsets from the row's start); a null offset table means contiguous.
struct Row {
  uint32_t row;
  int64_t cols;
  DType in_type;
  const void* in;
  const int64_t* in_off;
  DType out_type;
  void* out;
  const int64_t* out_off;
  Scale scale;
  float sigma;
  const float* sigma_col;
};

// A PCM chip's constants for one weight (fastnoise.hardware.pcm.PCM; pcm_cpu.cpp fills them).
struct PcmParams {
  float g_max;       // uS that max|W| maps to
  float s;           // g_max / max|W|: the programming map
  float s2;          // g_max / max|W_p|: the map of the programmed weight
  float prog_scale, read_scale, drift_scale;
  float std_scale;   // g_max / the g_max the programming polynomial was fitted at
  float coeff[4];    // the programming polynomial in g / g_max, zero-padded
  float log_drift;   // -ln((t + t0) / t0)
  float read_time;   // sqrt(ln((t + t0 + t_read) / (2 t_read)))
};

struct Kernels {
  const char* name;
  // out[4 j + i] = word x_i of Philox(counter (g0 + j, row, stream, offset)), j in [0, n)
  void (*philox_words)(const Stream& s, uint32_t row, uint32_t g0, int64_t n, uint32_t* out);
  // out[c] = z[row, c], c in [0, cols)
  void (*normal_row)(const Stream& s, uint32_t row, int64_t cols, float* out);
  // out = w + sigma z for one row, rounded once to the output type
  void (*noisy_row)(const Stream& s, const Row& r);
  // out[c] = W_p of w[c], z0 / z1 the programming normals of its two devices
  void (*pcm_program)(const PcmParams& p, int64_t n, const float* w, const float* z0, const float* z1,
                      float* out);
  // io[c]: W_p in, W_t out; zd the drift normals, zr the read normals
  void (*pcm_drift)(const PcmParams& p, int64_t n, const float* w, const float* zd, const float* zr, float* io);
};

// radius_table[lo] = sqrt(-2 ln((lo + 1/2) / 2**16)), float64 rounded to float32; filled by
// init_tables() (noise_cpu.cpp, baseline code) before any kernel runs
extern float radius_table[65536];
void init_tables();

extern const Kernels kernels_baseline;  // the build's baseline (x86-64: SSE2)
extern const Kernels kernels_avx2;      // AVX2 + FMA, chosen at run time on CPUs that have them
extern const Kernels kernels_avx512;    // AVX-512 F/BW/VL/DQ, 512-bit vectors (set_kernel_isa)

}  // namespace fastnoise_cpu
