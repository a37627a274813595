// The crossbar tile's elementwise stages on the CPU (fastnoise/tile_ops.py; the arithmetic is
// fastnoise/tile.py's, the reference fastnoise/reference.py's tile_linear_forward / _backward):
// each is one pass over its tensor where PyTorch needs three to eleven, in float32 or float64,
// with the reference's operations in its order (so float64 and float32 give its bits; the sums
// of tile_dac_backward_ are accumulated in float64).
//
//   tile_dac          the DAC: x clipped to [-r_t, r_t] and quantized to steps s_t, per tile
//   tile_adc_         a tile's partial output: + output noise, ADC quantization, the gradient
//                     mask, the clip to [-b, b], summed into y
//   tile_mask_grad    the gradient through the ADC clip: g, g / 2 or g * 0 by the mask
//   tile_dac_backward_  the input clip's gradient: zeroes gx where |x| > r_t and returns, per
//                     tile, the sums that make r_t's gradient and the count of clipped inputs
//   tile_absmax       max |W| over each tile's columns, per output channel
//
// Schemas here (a fragment of the fastnoise_cpu library of ../noise.cpp), not in noise.cpp: these
// ops are the tile's, called only by tile_ops.py's eager implementation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

void check_2d(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "fastnoise_cpu.tile: ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, "fastnoise_cpu.tile: ", what, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastnoise_cpu.tile: ", what, " must be float32 or float64, got ", t.scalar_type());
}

void check_row(const c10::optional<at::Tensor>& t, int64_t n, at::ScalarType dtype, const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_contiguous() && t->numel() == n && t->scalar_type() == dtype,
              "fastnoise_cpu.tile_adc_: ", what, " must be contiguous, ", n, " elements of ", dtype,
              ", got ", t->sizes(), " ", t->scalar_type());
}

std::vector<int64_t> tile_starts(at::IntArrayRef sizes, int64_t k) {
  std::vector<int64_t> starts(sizes.size() + 1, 0);
  for (size_t i = 0; i < sizes.size(); ++i) starts[i + 1] = starts[i] + sizes[i];
  TORCH_CHECK(starts.back() == k, "fastnoise_cpu.tile: the tile sizes sum to ", starts.back(),
              ", not the ", k, " columns");
  return starts;
}

// rows of an [M, *] tensor over threads (whole rows; at least ~16 Ki elements each)
template <typename Body>
void for_rows(int64_t rows, int64_t cols, const Body& body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), body);
}

// ------------------------------------------------------------------------------------ the DAC
// The row kernels: plain loops over raw pointers that the compiler vectorises (the selects are
// if-converted: no-trapping-math, which changes no result, only what may raise FP flags).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// builtins, not <cmath>'s inline wrappers: those were compiled before the pragma and would not
// be inlined into the loops below (which then stay scalar)
inline float abs_(float v) { return __builtin_fabsf(v); }
inline double abs_(double v) { return __builtin_fabs(v); }
inline float copysign_(float a, float b) { return __builtin_copysignf(a, b); }
inline double copysign_(double a, double b) { return __builtin_copysign(a, b); }

// round half to even (torch.round) without nearbyint, so the loops vectorise with SSE2:
// |v| + 2**p rounds to an integer in the current (nearest-even) mode; |v| >= 2**p is an integer
template <typename T>
inline T round_even(T v) {
  const T big = sizeof(T) == 4 ? T(8388608.0) : T(4503599627370496.0);
  const T a = abs_(v);
  const T r = (a + big) - big;
  return a < big ? copysign_(r, v) : v;
}

template <typename T, bool Clip, bool Quant>
void dac_row(const T* __restrict x, T* __restrict o, int64_t n, T hi, T s) {
  const T lo = -hi;
  for (int64_t c = 0; c < n; ++c) {
    T v = x[c];
    if (Clip) {
      v = v < lo ? lo : v;  // torch.clamp(x, -r, r) (a NaN stays NaN)
      v = v > hi ? hi : v;
    }
    o[c] = Quant ? round_even(v / s) * s : v;
  }
}

template <typename T>
void dac_rows(const T* x, int64_t sx, T* out, int64_t k, const std::vector<int64_t>& starts,
              const std::vector<double>& r, const std::vector<double>& step, int64_t m0, int64_t m1) {
  const size_t tiles = starts.size() - 1;
  const bool clip = !r.empty(), quant = !step.empty();
  for (int64_t m = m0; m < m1; ++m) {
    for (size_t t = 0; t < tiles; ++t) {
      const int64_t c0 = starts[t], n = starts[t + 1] - c0;
      const T* xr = x + m * sx + c0;
      T* o = out + m * k + c0;
      const T hi = clip ? T(r[t]) : T(0), s = quant ? T(step[t]) : T(1);
      if (clip && quant) dac_row<T, true, true>(xr, o, n, hi, s);
      else if (clip) dac_row<T, true, false>(xr, o, n, hi, s);
      else if (quant) dac_row<T, false, true>(xr, o, n, hi, s);
      else dac_row<T, false, false>(xr, o, n, hi, s);
    }
  }
}

// ------------------------------------------------------------------------------------ the ADC
// one row: v = p (+ noise z) quantized, its mask, clipped, into y (Acc: added; else p is y)
template <typename T, bool Noise, bool Quant, bool Acc>
void adc_row(const T* p, T* y, const float* __restrict z, const T* __restrict noise,
             const T* __restrict bound, const T* __restrict step, uint8_t* __restrict mask, int64_t n) {
  const T tiny = std::numeric_limits<T>::min();
  for (int64_t c = 0; c < n; ++c) {
    T v = p[c];
    if (Noise) v = v + noise[c] * T(z[c]);  // p + noise * z
    if (Quant) {
      const T s = step[c];
      v = round_even(v / (s > tiny ? s : tiny)) * s;  // round(p / s.clamp_min(tiny)) * s
    }
    const T b = bound[c], a = abs_(v);
    // 2 inside the bound, 1 exactly at it (half the gradient passes there), 0 beyond (and NaN)
    mask[c] = static_cast<uint8_t>(2 * int(a < b) + int(a == b));
    const T nb = -b;
    v = v < nb ? nb : v;  // torch.minimum(torch.maximum(p, -b), b)
    v = v > b ? b : v;
    y[c] = Acc ? y[c] + v : v;
  }
}

template <typename T, bool Noise, bool Quant>
void adc_rows_of(const T* p, T* y, bool acc, const float* z, const T* noise, const T* bound, const T* step,
                 uint8_t* mask, int64_t n, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* zr = Noise ? z + m * n : nullptr;
    if (acc) adc_row<T, Noise, Quant, true>(p + m * n, y + m * n, zr, noise, bound, step, mask + m * n, n);
    else adc_row<T, Noise, Quant, false>(p + m * n, y + m * n, zr, noise, bound, step, mask + m * n, n);
  }
}

template <typename T>
void adc_rows(const T* p, T* y, bool acc, const float* z, const T* noise, const T* bound, const T* step,
              uint8_t* mask, int64_t n, int64_t m0, int64_t m1) {
  if (z && step) adc_rows_of<T, true, true>(p, y, acc, z, noise, bound, step, mask, n, m0, m1);
  else if (z) adc_rows_of<T, true, false>(p, y, acc, z, noise, bound, step, mask, n, m0, m1);
  else if (step) adc_rows_of<T, false, true>(p, y, acc, z, noise, bound, step, mask, n, m0, m1);
  else adc_rows_of<T, false, false>(p, y, acc, z, noise, bound, step, mask, n, m0, m1);
}

template <typename T>
void mask_grad_rows(const T* __restrict g, const uint8_t* __restrict mask, T* __restrict o, int64_t i0,
                    int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    // g * 1, g * 0.5, g * 0 as the reference's g * mask (a NaN or inf stays one)
    const T v = g[i];
    const T f = mask[i] == 2 ? T(1) : (mask[i] == 1 ? T(0.5) : T(0));
    o[i] = mask[i] == 2 ? v : v * f;
  }
}

// one tile of one row: the clip's gradient into g, and the sums of r's gradient (summed in T in
// the vector's lanes, then in float64)
template <typename T>
void dac_backward_row(const T* __restrict x, T* __restrict g, int64_t n, T hi, double* acc) {
  const T lo = -hi;
  T up = 0, down = 0, clipped = 0;
#pragma omp simd reduction(+ : up, down, clipped)
  for (int64_t c = 0; c < n; ++c) {
    const T v = x[c], gv = g[c];
    const T neg = gv < T(0) ? gv : T(0), pos = gv > T(0) ? gv : T(0);
    up += v >= hi ? neg : T(0);    // sum over x >= r of min(g, 0)
    down += v <= lo ? pos : T(0);  // sum over x <= -r of max(g, 0)
    clipped += (v >= hi ? T(1) : T(0)) + (v <= lo ? T(1) : T(0));
    // the clip passes the gradient where |x| <= r (and, as the reference, where x is NaN)
    g[c] = (v > hi) | (v < lo) ? gv * T(0) : gv;
  }
  acc[0] += double(up);
  acc[1] += double(down);
  acc[2] += double(clipped);
}

// max |w| of a row's columns as the bits of |w| compared as integers (monotone for |w| >= 0,
// and a NaN's bits exceed inf's: a NaN in the row gives NaN, as torch's max(amax, -amin))
template <typename T, typename U>
T absmax_bits(const T* __restrict w, int64_t n) {
  static_assert(sizeof(T) == sizeof(U), "same width");
  const U keep = ~(U(1) << (8 * sizeof(U) - 1));
  U mx = 0;
  for (int64_t c = 0; c < n; ++c) {
    U u;
    __builtin_memcpy(&u, w + c, sizeof(U));
    u &= keep;
    mx = u > mx ? u : mx;
  }
  T out;
  __builtin_memcpy(&out, &mx, sizeof(T));
  return out;
}

inline float absmax_row(const float* w, int64_t n) { return absmax_bits<float, uint32_t>(w, n); }
inline double absmax_row(const double* w, int64_t n) { return absmax_bits<double, uint64_t>(w, n); }

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

at::Tensor tile_dac(const at::Tensor& x_, at::IntArrayRef sizes, at::ArrayRef<double> r,
                    at::ArrayRef<double> step) {
  check_2d(x_, "x");
  const at::Tensor x = x_.stride(1) == 1 ? x_ : x_.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  const auto starts = tile_starts(sizes, k);
  TORCH_CHECK(r.empty() || r.size() == sizes.size(), "fastnoise_cpu.tile_dac: one range per tile");
  TORCH_CHECK(step.empty() || step.size() == sizes.size(), "fastnoise_cpu.tile_dac: one step per tile");
  const std::vector<double> rv(r.begin(), r.end()), sv(step.begin(), step.end());
  at::Tensor out = at::empty({m, k}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tile_dac", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t sx = x.stride(0);
    for_rows(m, k, [&](int64_t m0, int64_t m1) { dac_rows(xp, sx, op, k, starts, rv, sv, m0, m1); });
  });
  return out;
}

void tile_adc_(const at::Tensor& p, at::Tensor& y, bool accumulate, const c10::optional<at::Tensor>& z,
               const c10::optional<at::Tensor>& noise, const at::Tensor& bound,
               const c10::optional<at::Tensor>& step, at::Tensor& mask) {
  check_2d(p, "p");
  const int64_t m = p.size(0), n = p.size(1);
  const auto dtype = p.scalar_type();
  TORCH_CHECK(p.is_contiguous() && y.is_contiguous() && y.sizes() == p.sizes() && y.scalar_type() == dtype,
              "fastnoise_cpu.tile_adc_: p and y must be contiguous, of one shape and dtype");
  TORCH_CHECK(mask.is_contiguous() && mask.sizes() == p.sizes() && mask.scalar_type() == at::kByte,
              "fastnoise_cpu.tile_adc_: mask must be contiguous uint8 of p's shape");
  if (z.has_value()) {
    TORCH_CHECK(z->is_contiguous() && z->sizes() == p.sizes() && z->scalar_type() == at::kFloat,
                "fastnoise_cpu.tile_adc_: z must be contiguous float32 of p's shape");
    TORCH_CHECK(noise.has_value(), "fastnoise_cpu.tile_adc_: z needs its scale (noise)");
  }
  check_row(noise, n, dtype, "noise");
  check_row(bound, n, dtype, "bound");
  check_row(step, n, dtype, "step");
  AT_DISPATCH_FLOATING_TYPES(dtype, "tile_adc_", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float* zp = z.has_value() ? z->data_ptr<float>() : nullptr;
    const scalar_t* np_ = noise.has_value() && z.has_value() ? noise->data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = bound.data_ptr<scalar_t>();
    const scalar_t* sp = step.has_value() ? step->data_ptr<scalar_t>() : nullptr;
    uint8_t* mp = mask.data_ptr<uint8_t>();
    for_rows(m, n, [&](int64_t m0, int64_t m1) {
      adc_rows(pp, yp, accumulate, zp, np_, bp, sp, mp, n, m0, m1);
    });
  });
}

// -------------------------------------------------------------------------- the backward passes
at::Tensor tile_mask_grad(const at::Tensor& g_, const at::Tensor& mask) {
  check_2d(g_, "g");
  const at::Tensor g = g_.contiguous();
  TORCH_CHECK(mask.is_contiguous() && mask.sizes() == g.sizes() && mask.scalar_type() == at::kByte,
              "fastnoise_cpu.tile_mask_grad: mask must be contiguous uint8 of g's shape");
  at::Tensor out = at::empty_like(g);
  const int64_t m = g.size(0), n = g.size(1);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "tile_mask_grad", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const uint8_t* mp = mask.data_ptr<uint8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_rows(m, n, [&](int64_t m0, int64_t m1) {
        mask_grad_rows(gp, mp, op, m0 * n, m1 * n);
    });
  });
  return out;
}

template <typename T>
void dac_backward_rows(const T* x, int64_t sx, T* gx, int64_t sg, const std::vector<int64_t>& starts,
                       const std::vector<double>& r, double* acc, int64_t m0, int64_t m1) {
  const size_t tiles = starts.size() - 1;
  for (int64_t m = m0; m < m1; ++m) {
    for (size_t t = 0; t < tiles; ++t) {
      const int64_t c0 = starts[t];
      dac_backward_row(x + m * sx + c0, gx + m * sg + c0, starts[t + 1] - c0, T(r[t]), acc + 3 * t);
    }
  }
}

at::Tensor tile_dac_backward_(const at::Tensor& x, at::Tensor& gx, at::IntArrayRef sizes, at::ArrayRef<double> r) {
  check_2d(x, "x");
  check_2d(gx, "gx");
  TORCH_CHECK(x.sizes() == gx.sizes() && x.scalar_type() == gx.scalar_type() && x.stride(1) == 1 &&
                  gx.stride(1) == 1,
              "fastnoise_cpu.tile_dac_backward_: x and gx must be of one shape and dtype, rows contiguous");
  const int64_t m = x.size(0), k = x.size(1);
  const auto starts = tile_starts(sizes, k);
  TORCH_CHECK(r.size() == sizes.size(), "fastnoise_cpu.tile_dac_backward_: one range per tile");
  const std::vector<double> rv(r.begin(), r.end());
  const int64_t tiles = static_cast<int64_t>(sizes.size());
  // per block of rows its own sums, added in block order: the result does not depend on threads
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  const int64_t blocks = (m + grain - 1) / grain;
  std::vector<double> part(static_cast<size_t>(std::max<int64_t>(blocks, 1) * 3 * tiles), 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tile_dac_backward_", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gp = gx.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        dac_backward_rows(xp, x.stride(0), gp, gx.stride(0), starts, rv, part.data() + b * 3 * tiles,
                          b * grain, std::min(m, (b + 1) * grain));
      }
    });
  });
  at::Tensor out = at::zeros({tiles, 3}, x.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t i = 0; i < 3 * tiles; ++i) o[i] += part[b * 3 * tiles + i];
  }
  return out;
}

at::Tensor tile_absmax(const at::Tensor& w_, at::IntArrayRef sizes) {
  check_2d(w_, "weight");
  const at::Tensor w = w_.stride(1) == 1 ? w_ : w_.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const auto starts = tile_starts(sizes, k);
  const int64_t tiles = static_cast<int64_t>(sizes.size());
  at::Tensor out = at::empty({tiles, n}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "tile_absmax", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t sw = w.stride(0);
    for_rows(n, k, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t t = 0; t < tiles; ++t) {
          op[t * n + r] = absmax_row(wp + r * sw + starts[t], starts[t + 1] - starts[t]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnoise_cpu, m) {
  m.def("tile_dac(Tensor x, int[] sizes, float[] r, float[] step) -> Tensor");
  m.def("tile_adc_(Tensor p, Tensor(a!) y, bool accumulate, Tensor? z, Tensor? noise, Tensor bound, "
        "Tensor? step, Tensor(b!) mask) -> ()");
  m.def("tile_mask_grad(Tensor g, Tensor mask) -> Tensor");
  m.def("tile_dac_backward_(Tensor x, Tensor(a!) gx, int[] sizes, float[] r) -> Tensor");
  m.def("tile_absmax(Tensor weight, int[] sizes) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastnoise_cpu, CPU, m) {
  m.impl("tile_dac", tile_dac);
  m.impl("tile_adc_", tile_adc_);
  m.impl("tile_mask_grad", tile_mask_grad);
  m.impl("tile_dac_backward_", tile_dac_backward_);
  m.impl("tile_absmax", tile_absmax);
}
