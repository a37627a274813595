// A PCM chip's effective weight on the CPU in three passes over the weight: the computation of
// fastnoise.hardware.pcm.PCM.effective_weight (its docstring has every formula) with the
// contract's normals drawn row by row into small buffers instead of weight-sized tensors.
//
// - pass 1, per row: the two devices' programming errors (stream 2, rows r and out + r), the
//   programmed weight W_p written into the output, the row's max |W_p| and sum |W_p|;
// - pass 2, per row: drift exponent (stream 3) and read noise (stream 4, the read key) of the
//   device that holds W_p, W_t written over W_p, the row's sum |W_t|;
// - pass 3: the global drift compensation's one scale (mean |W_p| / mean |W_t|).
//
// Row sums are kept per row and added in row order, so the result does not depend on the thread
// count. The elementwise work is the kernel copy's (noise_kernel.h: pcm_program, pcm_drift, in
// float32 in the reference's order of operations, ln and exp as polynomials so the loops
// vectorise); it agrees with the reference to a few float32 ulps.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "ops_common.h"

namespace fastnoise_cpu {
namespace {

constexpr float kZeroClip = 1e-7f;  // fastnoise.hardware.pcm._ZERO_CLIP

at::Tensor pcm_weight(const at::Tensor& weight, int64_t key, int64_t read_key, int64_t chip, int64_t read,
                      double t, at::ArrayRef<double> device, at::ArrayRef<double> prog_coeff) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "fastnoise_cpu.pcm_weight: weight must be a 2-D float32 CPU tensor, got ", weight.scalar_type(),
              " ", weight.sizes(), " on ", weight.device());
  TORCH_CHECK(device.size() == 8, "fastnoise_cpu.pcm_weight: device holds 8 values, got ", device.size());
  TORCH_CHECK(!prog_coeff.empty() && prog_coeff.size() <= 4,
              "fastnoise_cpu.pcm_weight: prog_coeff holds 1 to 4 coefficients, got ", prog_coeff.size());
  TORCH_CHECK(t >= 0, "fastnoise_cpu.pcm_weight: t must be >= 0, got ", t);
  const at::Tensor w = weight.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor out = at::empty({rows, cols}, w.options());
  if (w.numel() == 0) return out;
  // device: g_max, prog_noise_scale, read_noise_scale, drift_scale, compensation, t_read, t0,
  // the g_max the programming polynomial was fitted at
  PcmParams p{};
  p.g_max = static_cast<float>(device[0]);
  p.prog_scale = static_cast<float>(device[1]);
  p.read_scale = static_cast<float>(device[2]);
  p.drift_scale = static_cast<float>(device[3]);
  p.std_scale = static_cast<float>(device[0] / device[7]);
  for (size_t i = 0; i < prog_coeff.size(); ++i) p.coeff[i] = static_cast<float>(prog_coeff[i]);
  const bool compensation = device[4] != 0.0;
  const double t_read = device[5], t0 = device[6];
  p.log_drift = static_cast<float>(-std::log((t + t0) / t0));  // g(t) = g exp(nu log_drift)
  p.read_time = static_cast<float>(std::sqrt(std::log((t + t0 + t_read) / (2 * t_read))));
  const Kernels& k = kernels();
  const Stream prog = make_stream(key, chip, 2), drift = make_stream(key, chip, 3);
  const Stream noise = make_stream(read_key, read, 4);
  const float* wd = w.const_data_ptr<float>();
  float* od = out.data_ptr<float>();

  std::vector<float> row_max(static_cast<size_t>(rows), 0.0f);
  std::vector<double> row_sum(static_cast<size_t>(rows), 0.0);
  for_row_blocks(rows, cols, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float m = 0.0f;
      const float* wr = wd + r * cols;
      for (int64_t c = 0; c < cols; ++c) m = std::fmax(m, std::fabs(wr[c]));
      row_max[static_cast<size_t>(r)] = m;
    }
  });
  float amax = 0.0f;
  for (float m : row_max) amax = std::fmax(amax, m);
  p.s = p.g_max / std::fmax(amax, kZeroClip);

  // pass 1: W_p
  for_row_blocks(rows, cols, [&](int64_t begin, int64_t end) {
    std::vector<float> z0(static_cast<size_t>(cols)), z1(static_cast<size_t>(cols));
    for (int64_t r = begin; r < end; ++r) {
      k.normal_row(prog, static_cast<uint32_t>(r), cols, z0.data());
      k.normal_row(prog, static_cast<uint32_t>(rows + r), cols, z1.data());
      float* o = od + r * cols;
      k.pcm_program(p, cols, wd + r * cols, z0.data(), z1.data(), o);
      float m = 0.0f;
      double sum = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        m = std::fmax(m, std::fabs(o[c]));
        sum += std::fabs(o[c]);
      }
      row_max[static_cast<size_t>(r)] = m;
      row_sum[static_cast<size_t>(r)] = sum;
    }
  });
  float amax_p = 0.0f;
  double sum_p = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    amax_p = std::fmax(amax_p, row_max[static_cast<size_t>(r)]);
    sum_p += row_sum[static_cast<size_t>(r)];
  }
  p.s2 = p.g_max / std::fmax(amax_p, kZeroClip);

  // pass 2: W_t over W_p
  for_row_blocks(rows, cols, [&](int64_t begin, int64_t end) {
    std::vector<float> zd(static_cast<size_t>(cols)), zr(static_cast<size_t>(cols));
    for (int64_t r = begin; r < end; ++r) {
      k.normal_row(drift, static_cast<uint32_t>(r), cols, zd.data());
      k.normal_row(noise, static_cast<uint32_t>(r), cols, zr.data());
      float* o = od + r * cols;
      k.pcm_drift(p, cols, wd + r * cols, zd.data(), zr.data(), o);
      double sum = 0.0;
      for (int64_t c = 0; c < cols; ++c) sum += std::fabs(o[c]);
      row_sum[static_cast<size_t>(r)] = sum;
    }
  });
  if (!compensation) return out;

  // pass 3: alpha = mean |W_p| / mean |W_t|, each at least 1e-4 max|W|
  double sum_t = 0.0;
  for (double v : row_sum) sum_t += v;
  const double n = static_cast<double>(w.numel());
  const float floor = static_cast<float>(1e-4 * static_cast<double>(amax));
  const float alpha = std::fmax(static_cast<float>(sum_p / n), floor) / std::fmax(static_cast<float>(sum_t / n), floor);
  for_row_blocks(rows, cols, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * cols; i < end * cols; ++i) od[i] *= alpha;
  });
  return out;
}

}  // namespace
}  // namespace fastnoise_cpu

TORCH_LIBRARY_IMPL(fastnoise_cpu, CPU, m) { m.impl("pcm_weight", fastnoise_cpu::pcm_weight); }
