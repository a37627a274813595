// The schemas of fastnoise's C++ ops, declared once; the CPU implementations are in cpu/.
//
// Namespace `fastnoise_cpu`: Python already defines `fastnoise::noisy_linear` and friends with
// torch.library.custom_op, so these building blocks live apart from them. Every op follows the
// noise contract of fastnoise/rng.py (Philox4x32-10, eight normals per call from 16-bit
// uniforms); `seed` is in [0, 2**63), `offset` is taken modulo 2**32.
#include <ATen/ATen.h>
#include <torch/library.h>

TORCH_LIBRARY(fastnoise_cpu, m) {
  // words x0..x3 of the Philox calls (counter (g, r, stream, offset)) for r < rows, g < groups:
  // int64 [rows, groups, 4] holding uint32 values (for tests against rng.philox4x32)
  m.def("philox_words(int seed, int offset, int stream, int rows, int groups) -> Tensor");
  // the contract's z, float32 [rows, cols] (rng.normal_grid)
  m.def("normal_grid(int seed, int offset, int rows, int cols, int stream) -> Tensor");
  // W + sigma z (stream 0) in weight's shape and memory format, rounded once to dtype;
  // sigma float32 as NoiseSpec.sigma returns it, mode one of fastnoise.spec.MODE_*
  m.def("noisy_weight(Tensor weight, Tensor sigma, int mode, int seed, int offset, ScalarType dtype) -> Tensor");
  // b + sigma z_b: row 0 of stream 1, each element with its channel's sigma
  m.def("noisy_bias(Tensor bias, Tensor sigma, int mode, int seed, int offset, ScalarType dtype) -> Tensor");
  // a PCM chip's effective weight (fastnoise.hardware.pcm.PCM.effective_weight), float32 [out, K]
  // of a float32 [out, K] weight: programming error (stream 2, key), drift exponent (stream 3,
  // key) of chip `chip`, read noise of read `read` (stream 4, read_key) at t s; device holds
  // g_max, prog/read noise and drift scales, compensation (0/1), t_read, t0 and the g_max the
  // programming polynomial prog_coeff (in g / g_max) was fitted at
  m.def("pcm_weight(Tensor weight, int key, int read_key, int chip, int read, float t, float[] device, float[] prog_coeff) -> Tensor");
  // the instruction set of the kernels in use ("avx2" or "baseline"), and a way to choose it
  // (tests compare both); set_kernel_isa returns the previous choice
  m.def("kernel_isa() -> str");
  m.def("set_kernel_isa(str isa) -> str");
}

namespace {

at::Tensor noisy_like_meta(const at::Tensor& t, const at::Tensor& sigma, int64_t mode, int64_t seed,
                           int64_t offset, at::ScalarType dtype) {
  return at::empty_like(t, t.options().dtype(dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnoise_cpu, Meta, m) {
  m.impl("noisy_weight", noisy_like_meta);
  m.impl("noisy_bias", noisy_like_meta);
}
