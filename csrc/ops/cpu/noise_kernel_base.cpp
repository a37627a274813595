// The noise kernels for the build's baseline instruction set (x86-64: SSE2; any CPU torch runs on).
#include "kernel_api.h"

#define FASTNOISE_KERNEL_NS base
#define FASTNOISE_KERNEL_TABLE kernels_baseline
#define FASTNOISE_KERNEL_NAME "baseline"
#include "noise_kernel.h"
