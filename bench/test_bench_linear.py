"""Noisy linear layer and a 16-layer noisy MLP (GPU only; skipped without CUDA).

    python -m pytest bench/test_bench_linear.py --benchmark-group-by=param:shape,param:dtype,param:mode \\
        --benchmark-columns=median,iqr,rounds --benchmark-max-time=0.5

Providers: ``clean`` (``x @ w.t()``), ``naive`` (``x @ (w + s * randn_like(w)).t()``, ``s`` a
precomputed float) and ``fastnoise`` (``noisy_linear``, path ``auto``, sigma computed in every
call). M in {1, 16, 256, 2048, 8192} with N = K = 4096, and the odd weight 4091 x 1271; bf16
and fp32; forward and forward+backward. ``extra_info`` holds the medians of
``triton.testing.do_bench`` for the provider and for ``clean`` and ``naive`` (measured in this
session, cached per case), their ratios, and the peak memory of one call above what was
allocated before it. ``test_mlp_training_peak_memory``: one training step of a 16-layer
4096-wide bf16 MLP, peak memory against the clean MLP's.
"""

import pytest
import torch

try:
    from bench import gpu_linear
except ImportError:  # pytest put bench/ itself on sys.path
    import gpu_linear

from fastnoise import NoiseSpec
from fastnoise import _backends_linear as backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark (needs CUDA)")
pytest.importorskip("pytest_benchmark")

SHAPES = [(m, 4096, 4096) for m in (1, 16, 256, 2048, 8192)] + [(m, 1271, 4091) for m in (16, 2048)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ["clean", "naive", "fastnoise"]
_MS: dict = {}  # (shape, dtype, mode, provider) -> median ms, for the ratios
_PEAK_MB: dict = {}  # MLP provider -> peak MB


def _fn(shape, dtype, mode, provider):
    """A callable running one case, and the tensors whose grads it must reset."""
    m, k, n = shape
    dev = "cuda"
    x = torch.randn(m, k, device=dev).to(dtype).requires_grad_()
    w = (torch.randn(n, k, device=dev) / k**0.5).to(dtype).requires_grad_()
    fns = gpu_linear.providers(x, w, NoiseSpec(gpu_linear.ETA, "range"), dev)
    f = fns["auto" if provider == "fastnoise" else provider]
    if mode == "fwd":
        return f, None
    g = torch.randn(m, n, device=dev).to(dtype)
    return (lambda: f().backward(g)), [x, w]


def _median_ms(shape, dtype, mode, provider):
    key = (shape, dtype, mode, provider)
    if key not in _MS:
        fn, reset = _fn(shape, dtype, mode, provider)
        _MS[key] = gpu_linear.time_ms(fn, "cuda", grad_to_none=reset)
    return _MS[key]


def _peak_mb(fn) -> float:
    """Peak memory of one call above what was allocated before it, in MB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}")
def test_linear(benchmark, shape, dtype, mode, provider):
    dt = DTYPES[dtype]
    fn, reset = _fn(shape, dt, mode, provider)
    this_ms = gpu_linear.time_ms(fn, "cuda", grad_to_none=reset)
    _MS.setdefault((shape, dt, mode, provider), this_ms)
    clean_ms = _median_ms(shape, dt, mode, "clean")
    naive_ms = _median_ms(shape, dt, mode, "naive")
    m, k, n = shape
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "M": m, "K": k, "N": n, "dtype": dtype, "mode": mode,
        "provider": provider, "do_bench_ms": this_ms, "clean_ms": clean_ms, "naive_ms": naive_ms,
        "ratio_vs_clean": this_ms / clean_ms, "ratio_vs_naive": this_ms / naive_ms,
        "peak_mb": _peak_mb(fn),
        "path": backends.auto_path(torch.empty(m, k, device="meta")) if provider == "fastnoise" else None,
    })

    def call():
        if reset:
            for t in reset:
                t.grad = None
        fn()
        torch.cuda.synchronize()

    benchmark(call)


def _mlp_case(provider):
    """(model, x, peak MB of one training step after a warm-up step) for 16 x 4096 bf16."""
    width, depth, tokens = 4096, 16, 4096
    model = gpu_linear.mlp(provider, width, depth, "cuda", torch.bfloat16)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    gpu_linear.train_step(model, x)  # grads allocated, kernels tuned
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    gpu_linear.train_step(model, x)
    torch.cuda.synchronize()
    _PEAK_MB[provider] = torch.cuda.max_memory_allocated() / 2**20
    return model, x, _PEAK_MB[provider]


@pytest.mark.parametrize("provider", ["clean", "naive", "fastnoise"])
def test_mlp_training_peak_memory(benchmark, provider):
    """One step (forward, backward) of 16 x (Linear(4096, 4096), ReLU), bf16, 4096 tokens."""
    if provider != "clean" and "clean" not in _PEAK_MB:
        _mlp_case("clean")  # the baseline, measured in this session
        torch.cuda.empty_cache()
    model, x, peak = _mlp_case(provider)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "peak_mb": peak, "clean_peak_mb": _PEAK_MB["clean"],
        "peak_vs_clean": peak / _PEAK_MB["clean"], "saved_mb": gpu_linear.saved_bytes(model, x) / 2**20,
    })

    def call():
        gpu_linear.train_step(model, x)
        torch.cuda.synchronize()

    benchmark(call)
