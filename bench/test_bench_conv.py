"""Per-layer noisy conv2d on ResNet-50's conv shapes (GPU only; skipped without CUDA).

    python -m pytest bench/test_bench_conv.py --benchmark-group-by=param:shape,param:batch \\
        --benchmark-columns=median,iqr,rounds --benchmark-max-time=0.5

Providers, all bf16 channels_last: ``clean`` (cuDNN ``F.conv2d``), ``naive``
(``F.conv2d(x, w + s * torch.randn_like(w))``, ``s = eta * (max w - min w)``), and fastnoise's
``auto``, ``fused`` (implicit GEMM, noise in-kernel) and ``generate`` (W + s z once, then cuDNN).
The 53 convs are deduplicated into distinct shapes (``extra_info["count"]`` says how many times
each occurs); batch 1, 32 and 256. ``extra_info`` holds, for the provider and for ``clean``
measured in the same test, the eager median (``triton.testing.do_bench``: at small batch mostly
Python and launch overhead) and the GPU-only median from CUDA-graph replays
(``do_bench_cudagraph``), and their ratios; the fused path is skipped where its output is so
large that drawing the noise once per M-tile cannot compete.

``test_generate_all_weights``: every noisy weight of a ResNet-50 in one launch
(``noise_gen.noisy_weights_multi``) against one ``noisy_weight`` launch per layer.
"""

import pytest
import torch

try:
    from bench import gpu_conv
except ImportError:  # pytest put bench/ itself on sys.path
    import gpu_conv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark (needs CUDA)")
pytest.importorskip("pytest_benchmark")

ALL_SHAPES = gpu_conv.resnet50_conv_shapes()
SHAPES = gpu_conv.distinct_shapes(ALL_SHAPES)
COUNTS = gpu_conv.count_of(ALL_SHAPES)
PROVIDERS = ["clean", "naive", "auto", "fused", "generate"]
# Largest output M = N * OH * OW benchmarked on the fused path: beyond it the in-kernel noise
# (one |W| of normals per 64-row M-tile) is hundreds of times the generate path's.
FUSED_MAX_M = 65536


def _m(shape, batch):
    oh = (shape.hw + 2 * (shape.k // 2) - shape.k) // shape.stride + 1
    return batch * oh * oh


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 32, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conv_layer(benchmark, shape, batch, provider):
    m = _m(shape, batch)
    if provider == "fused" and m > FUSED_MAX_M:
        pytest.skip(f"fused path not a candidate at M={m}")
    dev = torch.device("cuda")
    fn = gpu_conv.layer_fn(shape, batch, provider, dev)
    clean = gpu_conv.layer_fn(shape, batch, "clean", dev)
    this_ms, clean_ms = gpu_conv.median_ms(fn), gpu_conv.median_ms(clean)
    this_gpu, clean_gpu = gpu_conv.gpu_ms(fn), gpu_conv.gpu_ms(clean)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "shape": str(shape), "count": COUNTS[shape],
        "batch": batch, "m": m, "provider": provider, "eager_ms": this_ms, "clean_eager_ms": clean_ms,
        "eager_ratio_vs_clean": this_ms / clean_ms, "gpu_ms": this_gpu, "clean_gpu_ms": clean_gpu,
        "gpu_ratio_vs_clean": None if this_gpu is None or clean_gpu is None else this_gpu / clean_gpu,
    })

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark(call)


@pytest.mark.parametrize("provider", ["per_layer", "multi"])
def test_generate_all_weights(benchmark, provider):
    """W + sigma z of all 53 convs of a ResNet-50 (fp32 weights, bf16 out)."""
    from fastnoise.kernels import noise_gen

    dev = torch.device("cuda")
    weights = [torch.randn(s.cout, s.cin, s.k, s.k, device=dev).contiguous(memory_format=torch.channels_last)
               for s in ALL_SHAPES]
    sigmas = [gpu_conv.SPEC.sigma(w) for w in weights]
    offset = torch.zeros((), dtype=torch.int64, device=dev)
    n = len(weights)
    if provider == "per_layer":
        def fn():
            return [noise_gen.noisy_weight(w, s, gpu_conv.SPEC.mode, i, offset, torch.bfloat16)
                    for i, (w, s) in enumerate(zip(weights, sigmas, strict=True))]
    else:
        def fn():
            return noise_gen.noisy_weights_multi(weights, sigmas, [gpu_conv.SPEC.mode] * n, list(range(n)),
                                                 [offset] * n, torch.bfloat16)
    benchmark.extra_info.update({"device": torch.cuda.get_device_name(), "layers": n,
                                 "elements": sum(w.numel() for w in weights),
                                 "do_bench_ms": gpu_conv.median_ms(fn)})

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark(call)
