"""Noisy linear on one GPU: correctness at full sizes, the kernel's noise, timings, memory.

``bench/run_gpu.py``'s parts use the helpers here (``check_case``, ``providers``, ``mlp``,
``saved_bytes``, ``train_step``); ``run(out_dir, quick=False)``, this module's own run, does:

1. correctness: every path (``fused``, ``generate``, ``auto``, and forward/backward on different
   paths) against :mod:`fastnoise.reference` on the same seed and offset, output and every
   gradient, bf16 / fp32 / fp16, N = K = 4096 at M in {1, 16, 256, 2048, 8192} and odd shapes.
   Metric ``max_err_ratio``: the worst ``err / (2 * err_same_dtype_torch + atol * scale)`` over
   output and gradients (the rule of :func:`fastnoise.testing.assert_close_to_reference`);
   ok when <= 1.
2. the noise read back from the fused kernel (identity input, zero weight, sigma = 1): equal to
   ``rng.normal_grid`` and N(0, 1) by moments and Kolmogorov-Smirnov.
3. the noise generation rate (normals/s of the generation kernel and of ``torch.randn_like``);
   timings (median of ``triton.testing.do_bench``, ms), forward and forward+backward, of
   ``clean`` (``x @ w.t()``), ``naive`` (``x @ (w + s * randn_like(w)).t()``, s a precomputed
   float) and fastnoise ``fused`` / ``generate`` / ``auto`` (sigma computed in every call), with
   the issue's targets: auto faster than naive everywhere, forward <= 0.5x naive at M <= 64,
   forward <= 1.15x clean at M = 8192; and ``auto_vs_best`` (does ``FUSED_MAX_M`` pick the
   faster path?).
4. peak memory of one training step of a 16-layer 4096-wide MLP (bf16): clean vs naive vs
   fastnoise, target fastnoise <= 1.05x clean; and the bytes each saves for backward.

``quick=True`` runs tiny shapes (also on CPU under ``TRITON_INTERPRET=1``, where timings are
wall-clock medians and no performance targets are checked). Full results go to
``out_dir/linear.json``; the returned rows ``{"case", "metric", "value", "target", "ok"}`` feed
the summary table.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastnoise
from fastnoise import NoiseSpec, rng
from fastnoise import _backends_linear as backends
from fastnoise.functional import noisy_linear
from fastnoise.testing import ATOL

SEED, OFFSET = 0x5EED_1234_ABCD, 3
ETA = 0.06
BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16
NAMES = {BF16: "bf16", F32: "fp32", F16: "fp16"}

# (leading dims of x, K, N)
FULL_CHECK_SHAPES = [((m,), 4096, 4096) for m in (1, 16, 256, 2048, 8192)] + [
    ((3, 41), 401, 1271), ((7,), 1271, 4091)]
QUICK_CHECK_SHAPES = [((5,), 64, 48)]
FULL_TIME_SHAPES = [(m, 4096, 4096) for m in (1, 16, 256, 2048, 8192)] + [
    (m, 1271, 4091) for m in (16, 2048)]  # (M, K, N): N=K=4096 and the odd 4091x1271 weight
QUICK_TIME_SHAPES = [(4, 64, 48)]
CROSSOVER_M = (1, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _shape_name(lead, k, n) -> str:
    return f"{'x'.join(map(str, lead))}x{k}->{n}"


def _row(case, metric, value, target, ok) -> dict:
    return {"case": case, "metric": metric, "value": value, "target": target, "ok": bool(ok)}


# ----------------------------------------------------------------------------- correctness
def err_ratio(out, torch_out, ref, factor=2.0) -> float:
    """``err / bound`` of :func:`fastnoise.testing.assert_close_to_reference` (ok: <= 1)."""
    if not torch.isfinite(out).all():
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    ref = ref.double()
    scale = max(1.0, ref.abs().max().item())
    err = (out.double() - ref).abs().max().item()
    base = (torch_out.double() - ref).abs().max().item()
    return err / (factor * base + ATOL[out.dtype] * scale)


def _fwd_bwd(x, w, b, spec, path, backward_path, grad):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = noisy_linear(x, w, b, spec, SEED, OFFSET, path=path, backward_path=backward_path)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), grad.to(y.dtype))
    return [y.detach(), dx, dw, db]


def check_case(lead, k, n, dtype, path, backward_path=None, device="cuda") -> float:
    """Worst error ratio of output, dX, dW, db of ``path`` vs the reference on one case."""
    gen = torch.Generator(device=device).manual_seed(k * 7919 + n)
    x = torch.randn(*lead, k, device=device, generator=gen).to(dtype)
    w = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, device=device, generator=gen).to(dtype)
    grad = torch.randn(*lead, n, device=device, generator=gen)
    spec = NoiseSpec(ETA, "range", noise_bias=True)
    got = _fwd_bwd(x, w, b, spec, path, backward_path, grad)
    same = _fwd_bwd(x, w, b, spec, "reference", None, grad)
    up = _fwd_bwd(x.double(), w.double(), b.double(), spec, "reference", None, grad.double())
    return max(err_ratio(a, t, r) for a, t, r in zip(got, same, up, strict=True))


def correctness(quick: bool, device: str) -> tuple[list, list]:
    shapes = QUICK_CHECK_SHAPES if quick else FULL_CHECK_SHAPES
    cases = []
    for dtype in (BF16, F32) if quick else (BF16, F32, F16):
        for lead, k, n in shapes:
            for path in ("fused", "generate"):
                cases.append((lead, k, n, dtype, path, None))
    if quick:  # leading dims, odd sizes
        cases.append(((3, 41), 150, 131, BF16, "fused", None))
    lead, k, n = shapes[0] if quick else ((16,), 4096, 4096)
    cases += [(lead, k, n, BF16, "auto", None), (lead, k, n, BF16, "fused", "generate"),
              (lead, k, n, BF16, "generate", "fused")]
    if not quick:
        cases.append(((8192,), 4096, 4096, BF16, "auto", None))
    rows, records = [], []
    for lead, k, n, dtype, path, bpath in cases:
        ratio = check_case(lead, k, n, dtype, path, bpath, device)
        label = path if bpath is None else f"{path}+bwd:{bpath}"
        case = f"{label} {NAMES[dtype]} {_shape_name(lead, k, n)}"
        rows.append(_row(case, "max_err_ratio", ratio, "<= 1", ratio <= 1))
        records.append({"case": case, "max_err_ratio": ratio})
    return rows, records


# ----------------------------------------------------------------------------- the noise itself
def noise_check(quick: bool, device: str) -> tuple[list, dict]:
    """z read back through the fused kernel, forward (``I @ z^T``) and input gradient (``I @ z``)."""
    from fastnoise.kernels import noisy_matmul
    from scipy import stats

    # z is [n, k]; k >= 2 * CHUNK_ALIGN so that the forward's reduction can be split
    n, k = (128, 256) if quick else (2048, 2048)
    w = torch.zeros(n, k, device=device)
    sigma = torch.ones(1, device=device)
    off = torch.tensor(OFFSET, device=device)
    want = rng.normal_grid(SEED, OFFSET, n, k, device=device)
    rows, info = [], {}
    for split in ((1, 2) if quick else (1, 4)):
        zf = noisy_matmul.noisy_matmul_fwd(torch.eye(k, device=device), w, None, sigma, 0, False,
                                           SEED, off, split_k=split).t()
        zb = noisy_matmul.noisy_matmul_dx(torch.eye(n, device=device), w, sigma, 0, SEED, off,
                                          split_k=split)
        err = max((zf - want).abs().max().item(), (zb - want).abs().max().item())
        rows.append(_row(f"fused split_k={split} z {n}x{k}", "noise_max_abs_err", err, "<= 2e-5",
                         err <= 2e-5))
        info[f"max_abs_err_split{split}"] = err
    z = zf.double().flatten().cpu().numpy()
    size = z.size
    moments = {  # each as a multiple of its standard error under N(0, 1)
        "mean": abs(z.mean()) / np.sqrt(1 / size),
        "var": abs(z.var() - 1) / np.sqrt(2 / size),
        "skew": abs(stats.skew(z)) / np.sqrt(6 / size),
        "kurtosis": abs(stats.kurtosis(z)) / np.sqrt(24 / size),
    }
    worst = max(moments.values())
    p = stats.kstest(z, "norm").pvalue
    rows.append(_row(f"fused {size} draws", "noise_moment_z", worst, "< 6", worst < 6))
    rows.append(_row(f"fused {size} draws", "noise_stats_p", p, "> 1e-3", p > 1e-3))
    info.update(moments=moments, ks_p=p, draws=size)
    return rows, info


# ----------------------------------------------------------------------------- timing
def time_ms(fn, device: str, grad_to_none=None) -> float:
    """Median ms: ``triton.testing.do_bench`` on CUDA, wall clock of a few calls elsewhere."""
    fn()  # autotune / compile outside the timing
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none,
                                       return_mode="median")
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def providers(x, w, spec, device):
    """name -> callable computing the layer's output (weights' noise drawn anew where noisy)."""
    s = ETA * (w.max() - w.min()).item()  # naive: sigma precomputed, not charged to it
    off = torch.tensor(OFFSET, device=device)

    def fastnoise_path(path):
        return lambda: noisy_linear(x, w, None, spec, SEED, off, path=path)

    return {
        "clean": lambda: F.linear(x, w),
        "naive": lambda: F.linear(x, w + s * torch.randn_like(w)),
        "fused": fastnoise_path("fused"),
        "generate": fastnoise_path("generate"),
        "auto": fastnoise_path("auto"),
    }


def timings(quick: bool, device: str) -> tuple[list, list]:
    shapes = QUICK_TIME_SHAPES if quick else FULL_TIME_SHAPES
    spec = NoiseSpec(ETA, "range")
    rows, records = [], []
    for dtype in (BF16,) if quick else (BF16, F32):
        for m, k, n in shapes:
            x = torch.randn(m, k, device=device).to(dtype).requires_grad_()
            w = (torch.randn(n, k, device=device) / k**0.5).to(dtype).requires_grad_()
            g = torch.randn(m, n, device=device).to(dtype)
            ms = {}
            for name, f in providers(x, w, spec, device).items():
                ms[("fwd", name)] = time_ms(f, device)
                ms[("fwd+bwd", name)] = time_ms(lambda f=f, g=g: f().backward(g), device,
                                                grad_to_none=[x, w])
            case = f"{NAMES[dtype]} M={m} K={k} N={n}"
            for (mode, name), v in ms.items():
                records.append({"dtype": NAMES[dtype], "M": m, "K": k, "N": n, "mode": mode,
                                "provider": name, "ms": v})
                rows.append(_row(f"{case} {mode} {name}", "ms", v, None, True))
            if quick:
                continue
            for mode in ("fwd", "fwd+bwd"):
                r = ms[(mode, "auto")] / ms[(mode, "naive")]
                rows.append(_row(f"{case} {mode} auto", "ratio_vs_naive", r, "< 1", r < 1))
            if m <= 64:
                r = ms[("fwd", "auto")] / ms[("fwd", "naive")]
                rows.append(_row(f"{case} fwd auto", "ratio_vs_naive", r, "<= 0.5", r <= 0.5))
            if m == 8192:
                r = ms[("fwd", "auto")] / ms[("fwd", "clean")]
                rows.append(_row(f"{case} fwd auto", "ratio_vs_clean", r, "<= 1.15", r <= 1.15))
            for mode in ("fwd", "fwd+bwd"):
                best = min(ms[(mode, "fused")], ms[(mode, "generate")])
                r = ms[(mode, "auto")] / best
                rows.append(_row(f"{case} {mode} auto", "auto_vs_best", r, "<= 1.1", r <= 1.1))
    return rows, records


def rng_rate(quick: bool, device: str) -> tuple[list, dict]:
    """Normals per second: the generation kernel (``W + sigma z`` of one bf16 weight, read and
    written) and ``torch.randn_like`` (normals only), side by side. RNG is the lever of the
    noisy matmul (DESIGN.md: 300-380 G/s with the earlier stream, randn_like 380-430 G/s)."""
    from fastnoise.kernels import noise_gen

    n = 256 if quick else 8192
    w = (torch.randn(n, n, device=device) / n**0.5).to(BF16)
    sigma = torch.full((1,), 0.01, device=device)
    off = torch.tensor([OFFSET], device=device)
    ms = {
        "noise_gen": time_ms(lambda: noise_gen.noisy_weight(w, sigma, 0, SEED, off, BF16), device),
        "randn_like": time_ms(lambda: torch.randn_like(w), device),
        "copy": time_ms(lambda: w.clone(), device),
    }
    rate = {k: w.numel() / (v * 1e-3) / 1e9 for k, v in ms.items() if k != "copy"}
    rows = [_row(f"bf16 {n}x{n} {k}", "G_normals_per_s", v, None, True) for k, v in rate.items()]
    rows.append(_row(f"bf16 {n}x{n} noise_gen", "ratio_vs_copy", ms["noise_gen"] / ms["copy"],
                     None, True))
    return rows, {"n": n, "ms": ms, "g_normals_per_s": rate}


def crossover(device: str) -> tuple[list, list]:
    """Forward ms of fused vs generate over M (bf16, N = K = 4096): where FUSED_MAX_M belongs."""
    spec = NoiseSpec(ETA, "range")
    w = (torch.randn(4096, 4096, device=device) / 64).to(BF16)
    records, last_fused_win = [], 0
    for m in CROSSOVER_M:
        x = torch.randn(m, 4096, device=device).to(BF16)
        p = providers(x, w, spec, device)
        fused, gen = time_ms(p["fused"], device), time_ms(p["generate"], device)
        records.append({"M": m, "fused_ms": fused, "generate_ms": gen})
        if fused < gen:
            last_fused_win = m
    rows = [_row("bf16 N=K=4096 fwd", "fused_wins_up_to_m", last_fused_win,
                 f"FUSED_MAX_M={backends.FUSED_MAX_M}", True)]
    return rows, records


# ----------------------------------------------------------------------------- memory
class NaiveNoisyLinear(nn.Linear):
    """``x @ (w + s * randn_like(w)).t() + b``: keeps the noisy weight alive until backward."""

    def forward(self, x):
        s = ETA * (self.weight.max() - self.weight.min()).detach()
        return F.linear(x, self.weight + s * torch.randn_like(self.weight), self.bias)


def mlp(kind: str, width: int, depth: int, device, dtype) -> nn.Module:
    cls = {"clean": nn.Linear, "naive": NaiveNoisyLinear, "fastnoise": fastnoise.Linear}[kind]
    layers = []
    for i in range(depth):
        layers.append(cls(width, width, device=device, dtype=dtype))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).train()


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def train_step(model, x):
    loss = model(x).float().square().mean()
    loss.backward()
    model.zero_grad(set_to_none=False)


def memory(quick: bool, device: str) -> tuple[list, dict]:
    width, depth, tokens = (64, 4, 32) if quick else (4096, 16, 4096)
    dtype = F32 if device == "cpu" else BF16
    rows, info = [], {"width": width, "depth": depth, "tokens": tokens, "dtype": NAMES[dtype]}
    peaks, saved = {}, {}
    for kind in ("clean", "naive", "fastnoise"):
        torch.manual_seed(0)
        model = mlp(kind, width, depth, device, dtype)
        x = torch.randn(tokens, width, device=device, dtype=dtype)
        saved[kind] = saved_bytes(model, x) / 2**20
        train_step(model, x)  # allocates .grad and warms up kernels and workspaces
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            train_step(model, x)
            torch.cuda.synchronize()
            peaks[kind] = torch.cuda.max_memory_allocated() / 2**20
        del model, x
        if device == "cuda":
            torch.cuda.empty_cache()
    case = f"MLP {depth}x{width} tokens={tokens} {NAMES[dtype]}"
    for kind in saved:
        rows.append(_row(f"{case} {kind}", "saved_mb", saved[kind], None, True))
    info["saved_mb"] = saved
    if peaks:
        for kind, v in peaks.items():
            rows.append(_row(f"{case} {kind}", "peak_mb", v, None, True))
        r = peaks["fastnoise"] / peaks["clean"]
        rows.append(_row(f"{case} fastnoise", "peak_vs_clean", r, "<= 1.05", r <= 1.05))
        info["peak_mb"] = peaks
    # fastnoise keeps for backward what the clean layer keeps (inputs), naive also its noisy weights
    r = saved["fastnoise"] / saved["clean"]
    rows.append(_row(f"{case} fastnoise", "saved_vs_clean", r, "<= 1.05", r <= 1.05))
    return rows, info


# ----------------------------------------------------------------------------- driver
def autotune_choices() -> dict:
    from fastnoise.kernels import noisy_matmul

    cache = getattr(noisy_matmul._noisy_matmul_kernel, "cache", {})
    return {str(k): str(v) for k, v in cache.items()}


def run(out_dir: str, quick: bool = False) -> list[dict]:
    """Check and time the noisy linear; write ``out_dir/linear.json``; return the summary rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("gpu_linear needs a CUDA GPU, or TRITON_INTERPRET=1 with quick=True")
    if device == "cpu" and not quick:
        raise RuntimeError("on CPU (Triton interpreter) only quick=True is practical")
    torch.manual_seed(0)
    fastnoise.manual_seed(0)
    t0 = time.perf_counter()
    rows, result = [], {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                        "quick": quick, "fused_max_m": backends.FUSED_MAX_M}
    part_rows, result["correctness"] = correctness(quick, device)
    rows += part_rows
    part_rows, result["noise"] = noise_check(quick, device)
    rows += part_rows
    part_rows, result["rng_rate"] = rng_rate(quick, device)
    rows += part_rows
    part_rows, result["timings"] = timings(quick, device)
    rows += part_rows
    if not quick:
        part_rows, result["crossover"] = crossover(device)
        rows += part_rows
    part_rows, result["memory"] = memory(quick, device)
    rows += part_rows
    result["autotune"] = autotune_choices()
    result["seconds"] = time.perf_counter() - t0
    result["rows"] = rows
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return rows
