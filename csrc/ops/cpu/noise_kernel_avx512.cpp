// The noise kernels compiled for AVX-512 (F, BW, VL, DQ: x86-64-v4) with 512-bit vectors, chosen
// at run time by noise_cpu.cpp on CPUs that have them. Only this file's own code is compiled for
// that target: the pragma comes after every include, and noise_kernel.h uses builtins only.
#include "kernel_api.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,lzcnt,popcnt,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,lzcnt,popcnt,f16c")
#pragma GCC target("prefer-vector-width=512")
#endif
#define FASTNOISE_KERNEL_NS avx512
#define FASTNOISE_KERNEL_TABLE kernels_avx512
#define FASTNOISE_KERNEL_NAME "avx512"
#include "noise_kernel.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
namespace fastnoise_cpu {
const Kernels kernels_avx512 = {nullptr, nullptr, nullptr, nullptr};  // not an x86-64 build
}
#endif
