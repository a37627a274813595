// The noise contract of fastnoise/rng.py for the CPU, written for the compiler's loop vectoriser.
//
// Included once per instruction set by a file that first includes kernel_api.h, then defines
// FASTNOISE_KERNEL_NS (a namespace of its own, so the copies never meet at link time) and
// FASTNOISE_KERNEL_TABLE (the Kernels object to define), and possibly a `#pragma GCC target`.
// Nothing here calls into std or torch: only builtins, so every instruction comes from this
// file under that file's target.
//
// Layout of the work: a block is kLanes consecutive Philox calls of one row (8 columns each).
// Lane l of the vectorised loops is call l; its four words give the eight normals
// z[8 l .. 8 l + 7] = (rho_i cos theta_i, rho_i sin theta_i), i = 0..3, stored interleaved into
// a small float buffer, which the second loop (also vectorised) turns into w + sigma z.
//
// Box-Muller in float32 without libm:
// - radius: the low 16 bits index radius_table, sqrt(-2 ln a) for each of the 65536 values of
//   a, computed once in float64 and rounded to float32 (256 KiB: fits L2). Measured against a
//   vectorised float32 log polynomial + sqrt instruction: 4.3 vs 5.4 ms per 2**20 normals on
//   this project's Zen 1 build machine (csrc/README.md).
// - angle: theta = 2 pi (h + 1/2) 2**-16 = k pi/2 + t with k the nearest quadrant (two bits of
//   h + 2**13) and t = (d + 1/2) 2 pi 2**-16, d = h - 2**14 k in [-2**13, 2**13): |t| < pi/4.
//   sin t and cos t are their Taylor polynomials to degree 9 and 10 (truncation < 2e-9 and
//   1.2e-10); (cos, sin) of theta is (cos t, sin t) turned by k quarter turns: a swap and two
//   sign flips.
// z = rho * cos theta rounds once more: |z - reference| is within ~2 float32 ulps of |z|.
// Everything is float32 without fused multiply-adds (the build passes -ffp-contract=off), so the
// baseline and AVX2 copies give the same bits.

#ifndef FASTNOISE_KERNEL_NS
#error "define FASTNOISE_KERNEL_NS before including noise_kernel.h"
#endif

namespace fastnoise_cpu {
namespace FASTNOISE_KERNEL_NS {

constexpr int kLanes = 16;             // Philox calls per block
constexpr int kBlock = kLanes * 8;     // columns per block
constexpr int kRounds = 10;            // fastnoise.rng.PHILOX_ROUNDS
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

static inline uint32_t f2u(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

static inline float u2f(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// x[i][l] = word i of the Philox call of group g0 + l of `row`
static inline void philox_block(const Stream& s, uint32_t row, uint32_t g0,
                                uint32_t (&x)[4][kLanes]) {
  uint32_t k0[kRounds], k1[kRounds];
  k0[0] = s.k0;
  k1[0] = s.k1;
  for (int i = 1; i < kRounds; ++i) {
    k0[i] = k0[i - 1] + kW0;
    k1[i] = k1[i - 1] + kW1;
  }
  for (int l = 0; l < kLanes; ++l) {
    uint32_t c0 = g0 + static_cast<uint32_t>(l), c1 = row, c2 = s.stream, c3 = s.offset;
#pragma GCC unroll 10
    for (int i = 0; i < kRounds; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(c0) * kM0;
      const uint64_t p1 = static_cast<uint64_t>(c2) * kM1;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0[i];
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1[i];
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
    }
    x[0][l] = c0;
    x[1][l] = c1;
    x[2][l] = c2;
    x[3][l] = c3;
  }
}

// (cos theta, sin theta) for theta = 2 pi ((w >> 16) + 1/2) 2**-16
static inline void angle(uint32_t w, float& cos_out, float& sin_out) {
  const uint32_t h = w >> 16;
  const uint32_t k = (h + 8192u) >> 14;  // nearest quadrant, 0..4
  const int32_t d = static_cast<int32_t>(h) - static_cast<int32_t>(k << 14);  // [-8192, 8191]
  const float t = (static_cast<float>(d) + 0.5f) * 9.5873799242852576e-05f;  // 2 pi / 2**16
  const float t2 = t * t;
  const float sin_t = t + t * t2 * (-1.6666666666666666e-01f + t2 * (8.3333333333333332e-03f
                      + t2 * (-1.9841269841269841e-04f + t2 * 2.7557319223985893e-06f)));
  const float cos_t = 1.0f + t2 * (-0.5f + t2 * (4.1666666666666664e-02f + t2 * (
                      -1.3888888888888889e-03f + t2 * (2.4801587301587302e-05f
                      + t2 * -2.7557319223985888e-07f))));
  const uint32_t q = k & 3u;
  const bool odd = (q & 1u) != 0;
  const float c = odd ? sin_t : cos_t;
  const float s = odd ? cos_t : sin_t;
  // quarter turns: (c, s) -> (c, s), (-s, c), (-c, -s), (s, -c)
  const uint32_t flip_c = (q == 1u || q == 2u) ? 0x80000000u : 0u;
  const uint32_t flip_s = (q >= 2u) ? 0x80000000u : 0u;
  cos_out = u2f(f2u(c) ^ flip_c);
  sin_out = u2f(f2u(s) ^ flip_s);
}

// z[8 l + n] for the block of groups g0 .. g0 + kLanes - 1
static inline void normal_block(const Stream& s, uint32_t row, uint32_t g0, float* __restrict z) {
  uint32_t x[4][kLanes];
  philox_block(s, row, g0, x);
  for (int l = 0; l < kLanes; ++l) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = x[i][l];
      const float rho = radius_table[w & 0xFFFFu];
      float c, sn;
      angle(w, c, sn);
      z[8 * l + 2 * i] = rho * c;
      z[8 * l + 2 * i + 1] = rho * sn;
    }
  }
}

// ---------------------------------------------------------------------------- dtype conversions
// bfloat16 / float16 travel as their bits (uint16_t); round to nearest even, as torch does.

static inline float bf16_to_f32(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

// all-ones when c holds: selects as bit masks keep the conversion loops free of branches
static inline uint32_t mask(bool c) { return 0u - static_cast<uint32_t>(c); }

static inline uint32_t select(uint32_t m, uint32_t a, uint32_t b) { return (a & m) | (b & ~m); }

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // exponent and mantissa moved into a float's fields give the value times 2**-112, for
  // normals and subnormals alike; inf / NaN keep an all-ones exponent
  const float scaled = u2f(em << 13) * 5.192296858534828e+33f;  // 2**112
  const uint32_t bits = select(mask(em >= 0x7C00u), (em << 13) | 0x7F800000u, f2u(scaled));
  return u2f(bits | sign);
}

static inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select(mask((u & 0x7FFFFFFFu) > 0x7F800000u), 0x7FC0u, rounded));
}

static inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f2u(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // normal halves: drop 13 mantissa bits with round to nearest even, rebias the exponent
  const uint32_t normal = (a + 0x0FFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  // subnormal halves (|f| < 2**-14): adding 1/2 puts the float's last bit at 2**-24, the
  // half's unit, and the addition rounds to nearest even
  const uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3F000000u;
  uint32_t h = select(mask(a < 0x38800000u), sub, normal);
  h = select(mask(a >= 0x477FF000u), 0x7C00u, h);  // rounds to >= 65520: infinity
  h = select(mask(a > 0x7F800000u), 0x7E00u, h);   // NaN
  return static_cast<uint16_t>(h | sign);
}

template <typename T>
struct Io;
template <>
struct Io<float> {
  static inline float get(const float* p, int64_t i) { return p[i]; }
  static inline void put(float* p, int64_t i, float v) { p[i] = v; }
};
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
template <>
struct Io<Bf16> {
  static inline float get(const Bf16* p, int64_t i) { return bf16_to_f32(p[i].bits); }
  static inline void put(Bf16* p, int64_t i, float v) { p[i].bits = f32_to_bf16(v); }
};
template <>
struct Io<F16> {
  static inline float get(const F16* p, int64_t i) { return f16_to_f32(p[i].bits); }
  static inline void put(F16* p, int64_t i, float v) { p[i].bits = f32_to_f16(v); }
};

// ---------------------------------------------------------------------------- w + sigma z
// the reference's order of operations: s = sigma (or sigma * |w|), then w + s * z, in float32
template <Scale S>
static inline float noisy_value(float v, float z, float sigma, const float* __restrict sigma_col,
                                int64_t j) {
  const float s = S == Scale::Scalar      ? sigma
                  : S == Scale::PerColumn ? sigma_col[j]
                                          : sigma * __builtin_fabsf(v);
  return v + s * z;
}

template <typename In, typename Out, Scale S>
static inline void apply_contiguous(const In* __restrict w, Out* __restrict o, const float* __restrict z,
                                    int64_t n, float sigma, const float* __restrict sigma_col) {
  for (int64_t j = 0; j < n; ++j) {
    Io<Out>::put(o, j, noisy_value<S>(Io<In>::get(w, j), z[j], sigma, sigma_col, j));
  }
}

template <typename In, typename Out, Scale S>
static inline void apply_strided(const In* __restrict w, const int64_t* __restrict w_off,
                                 Out* __restrict o, const int64_t* __restrict o_off,
                                 const float* __restrict z, int64_t n, float sigma,
                                 const float* __restrict sigma_col) {
  for (int64_t j = 0; j < n; ++j) {
    Io<Out>::put(o, o_off[j], noisy_value<S>(Io<In>::get(w, w_off[j]), z[j], sigma, sigma_col, j));
  }
}

template <typename In, typename Out, Scale S>
static void noisy_row_t(const Stream& s, const Row& r) {
  const In* w = static_cast<const In*>(r.in);
  Out* o = static_cast<Out*>(r.out);
  alignas(64) float z[kBlock];
  for (int64_t c0 = 0; c0 < r.cols; c0 += kBlock) {
    normal_block(s, r.row, static_cast<uint32_t>(c0 >> 3), z);
    const int64_t n = r.cols - c0 < kBlock ? r.cols - c0 : kBlock;
    const float* sc = r.sigma_col ? r.sigma_col + c0 : nullptr;
    if (r.in_off == nullptr && r.out_off == nullptr) {
      apply_contiguous<In, Out, S>(w + c0, o + c0, z, n, r.sigma, sc);
    } else {
      apply_strided<In, Out, S>(w, r.in_off + c0, o, r.out_off + c0, z, n, r.sigma, sc);
    }
  }
}

template <typename In, typename Out>
static void noisy_row_scale(const Stream& s, const Row& r) {
  switch (r.scale) {
    case Scale::Scalar: return noisy_row_t<In, Out, Scale::Scalar>(s, r);
    case Scale::PerColumn: return noisy_row_t<In, Out, Scale::PerColumn>(s, r);
    case Scale::Proportional: return noisy_row_t<In, Out, Scale::Proportional>(s, r);
  }
}

template <typename In>
static void noisy_row_out(const Stream& s, const Row& r) {
  switch (r.out_type) {
    case DType::F32: return noisy_row_scale<In, float>(s, r);
    case DType::BF16: return noisy_row_scale<In, Bf16>(s, r);
    case DType::F16: return noisy_row_scale<In, F16>(s, r);
  }
}

static void noisy_row(const Stream& s, const Row& r) {
  switch (r.in_type) {
    case DType::F32: return noisy_row_out<float>(s, r);
    case DType::BF16: return noisy_row_out<Bf16>(s, r);
    case DType::F16: return noisy_row_out<F16>(s, r);
  }
}

static void normal_row(const Stream& s, uint32_t row, int64_t cols, float* out) {
  alignas(64) float z[kBlock];
  int64_t c0 = 0;
  for (; c0 + kBlock <= cols; c0 += kBlock) {
    normal_block(s, row, static_cast<uint32_t>(c0 >> 3), out + c0);
  }
  if (c0 < cols) {
    normal_block(s, row, static_cast<uint32_t>(c0 >> 3), z);
    for (int64_t j = 0; c0 + j < cols; ++j) out[c0 + j] = z[j];
  }
}

static void philox_words(const Stream& s, uint32_t row, uint32_t g0, int64_t n, uint32_t* out) {
  uint32_t x[4][kLanes];
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    philox_block(s, row, g0 + static_cast<uint32_t>(j0), x);
    for (int64_t j = j0; j < n && j < j0 + kLanes; ++j) {
      for (int i = 0; i < 4; ++i) out[4 * j + i] = x[i][j - j0];
    }
  }
}

// ---------------------------------------------------------------------------- PCM
// ln x and e^x in float32 without libm, so the PCM loops vectorise (Cephes' logf and expf:
// relative error ~1e-7, within 2 float32 ulps of torch's own). Comparisons are selects; e^x is
// clamped to the float range, ln x is for normal x > 0 only (the callers clamp from below).

// c ? a : b as a bit select: GCC does not vectorise a loop where a ?: value reaches a bit cast
static inline float pick(bool c, float a, float b) { return u2f(select(mask(c), f2u(a), f2u(b))); }

static inline float clamp_to(float x, float lo, float hi) { return pick(x > hi, hi, pick(x < lo, lo, x)); }

static inline float log_pos(float x) {
  const uint32_t b = f2u(x);
  const float m0 = u2f((b & 0x007FFFFFu) | 0x3F000000u);  // x = m0 2**e0, m0 in [0.5, 1)
  // m0 < sqrt(1/2): x = (2 m0) 2**(e0 - 1); as a bit mask, so the loops stay free of branches
  const uint32_t low = mask(m0 < 0.707106781186547524f);
  const float fe = static_cast<float>(static_cast<int32_t>(b >> 23) - 126 - static_cast<int32_t>(low & 1u));
  const float m = u2f(select(low, f2u(m0 + m0), f2u(m0))) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + fe * 0.693359375f;
}

static inline float exp_of(float x) {
  x = clamp_to(x, -87.0f, 88.0f);
  float fn = x * 1.44269504088896341f;
  fn = (fn + 12582912.0f) - 12582912.0f;  // the nearest integer (1.5 * 2**23 shifts it out)
  const int32_t n = static_cast<int32_t>(fn);
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const float z = r * r;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float y = (q * z + r) + 1.0f;
  return y * u2f(static_cast<uint32_t>(n + 127) << 23);
}

// device target (uS) of weight v: max(v, 0) s, at most g_max
static inline float pcm_target(float v, float s, float g_max) {
  const float g = pick(v > 0.0f, v, 0.0f) * s;
  return pick(g > g_max, g_max, g);
}

static inline float pcm_prog_std(const PcmParams& p, float g) {
  const float x = g / p.g_max;
  float std = p.coeff[0], q = 1.0f;
#pragma GCC unroll 3
  for (int i = 1; i < 4; ++i) {
    q = q * x;
    std = std + p.coeff[i] * q;
  }
  return std * p.std_scale;
}

static void pcm_program(const PcmParams& p, int64_t n, const float* __restrict w, const float* __restrict z0,
                        const float* __restrict z1, float* __restrict out) {
  for (int64_t c = 0; c < n; ++c) {
    const float g0 = pcm_target(w[c], p.s, p.g_max), g1 = pcm_target(-w[c], p.s, p.g_max);
    float p0 = z0[c] * pcm_prog_std(p, g0) * p.prog_scale + g0;
    float p1 = z1[c] * pcm_prog_std(p, g1) * p.prog_scale + g1;
    out[c] = (pick(p0 < 0.0f, 0.0f, p0) - pick(p1 < 0.0f, 0.0f, p1)) / p.s;
  }
}

static void pcm_drift(const PcmParams& p, int64_t n, const float* __restrict w, const float* __restrict zd,
                      const float* __restrict zr, float* __restrict io) {
  for (int64_t c = 0; c < n; ++c) {
    const float wp = io[c];
    const bool pos = wp >= 0.0f;
    const float g = __builtin_fabsf(wp) * p.s2;  // the device of the pair that holds W_p
    const float gt = pcm_target(pick(pos, w[c], -w[c]), p.s, p.g_max);  // its target
    const float lg = log_pos(clamp_to(__builtin_fabsf(gt / p.g_max), 1e-7f, 3.0e38f));
    const float mu = clamp_to(-0.0155f * lg + 0.0244f, 0.049f, 0.1f);
    const float sd = clamp_to(-0.0125f * lg - 0.0059f, 0.008f, 0.045f);
    const float nu = __builtin_fabsf(zd[c] * sd + mu) * p.drift_scale;
    const float gd = exp_of(nu * p.log_drift) * g;
    // (g / g_max)^0.65, below 1e-3 (g / g_max < 2.4e-5) clamped: ln of at least 1e-6 serves
    const float pw = exp_of(0.65f * log_pos(clamp_to(__builtin_fabsf(g) / p.g_max, 1e-6f, 3.0e38f)));
    const float q = clamp_to(0.0088f / clamp_to(pw, 1e-3f, 3.0e38f), 0.0f, 0.2f);
    const float sig = q * p.read_time * p.read_scale;
    const float gr = clamp_to(zr[c] * sig * __builtin_fabsf(gd) + gd, 0.0f, 3.0e38f);
    io[c] = pick(pos, gr, -gr) / p.s2;
  }
}

}  // namespace FASTNOISE_KERNEL_NS

const Kernels FASTNOISE_KERNEL_TABLE = {
    FASTNOISE_KERNEL_NAME,
    FASTNOISE_KERNEL_NS::philox_words,
    FASTNOISE_KERNEL_NS::normal_row,
    FASTNOISE_KERNEL_NS::noisy_row,
    FASTNOISE_KERNEL_NS::pcm_program,
    FASTNOISE_KERNEL_NS::pcm_drift,
};

}  // namespace fastnoise_cpu
