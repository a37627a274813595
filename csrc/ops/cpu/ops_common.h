// What the torch-facing CPU ops share (noise_cpu.cpp defines these; pcm_cpu.cpp uses them): the
// kernel copy in use, a Philox stream from a seed, and rows spread over threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kernel_api.h"

namespace fastnoise_cpu {

// the kernel copy chosen for this CPU (or by set_kernel_isa), its tables initialised
const Kernels& kernels();

// the Philox key of `seed` (in [0, 2**63)) and the counter words stream / offset (mod 2**32)
Stream make_stream(int64_t seed, int64_t offset, uint32_t stream);

// Rows in blocks of about 16 Ki elements, handed out one at a time to whichever thread is free
// (an atomic counter) rather than split in equal halves up front: a thread that wakes late or
// shares its core with another process then does fewer blocks instead of holding up the call.
// One block, one thread, or a call from inside a parallel region runs on the calling thread.
template <typename Body>
void for_row_blocks(int64_t rows, int64_t cols, const Body& body) {
  const int64_t block = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  const int64_t blocks = (rows + block - 1) / block;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(blocks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) {
      body(b * block, std::min(rows, (b + 1) * block));
    }
  });
}

}  // namespace fastnoise_cpu
