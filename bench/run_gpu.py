"""Check and time fastnoise on one lent GPU in one call that fits a budget; a short table last.

    python bench/run_gpu.py --budget 480 --out $OUT            # on the GPU machine (the device tool)
    python bench/run_gpu.py --budget 480 --dry-run             # the plan: parts, estimates, dropped
    python bench/run_gpu.py --smoke --out /tmp/smoke           # every part on tiny shapes (CPU too)
    python bench/run_gpu.py --budget 300 --only linear_timing,mlp_memory --out $OUT   # a rerun

What it does, in order of value (:data:`PARTS`): the full-size correctness matrix of every path
(fused, generate, reference; forward and every gradient; bf16, fp16, fp32) for Linear and Conv2d,
the noise read back from the kernels through moment and Kolmogorov-Smirnov tests, then the
timings of issue 23's targets (:data:`TARGETS`), the dispatch crossover sweeps that set
``FUSED_MAX_M`` / ``FUSED_MAX_OUTPUT_PIXELS`` / ``FUSED_MIN_WEIGHT_NUMEL``, and a decoder size
sweep up to a 1B-class Llama (random weights).

The budget (at most :data:`MAX_BUDGET_S` seconds: a task has 15 minutes of device time, the
machine's start and a rerun included) is planned before anything runs: parts are taken in value
order while their estimated seconds fit, and the rest are dropped and listed. While running, a
part whose estimate no longer fits in the time left is dropped too, and a part that runs far past
its estimate is stopped (:func:`part_cap_s`) with what it measured kept.

Everything goes to ``--out`` as it is measured: ``environment.json`` (device, driver, CUDA,
torch, Triton, date, commit, the autotune lists), ``plan.json``, ``results.jsonl`` (one JSON
object a line, flushed at once, so a killed run keeps what it measured), and at the end
``summary.json`` and ``summary.txt`` (the table printed last: each target's figure and
pass/miss, each part's estimated and measured seconds).

Timing (METHOD.md): medians of ``triton.testing.do_bench`` (CUDA events) or of CUDA-graph
replays (``do_bench_cudagraph``, GPU time without launch overhead), calls longer than a few ms
timed one by one and synchronized; random inputs, never zeros; every ratio is of two figures
measured side by side in this run. Compilation and autotuning happen in an untimed first call;
the autotune lists are cut to a few configs (:func:`short_autotune`) so each kernel variant
compiles once or a few times.

Adding a part (the PCM chip evaluation, the crossbar tile, ...): write ``def part_x(ctx)``
that measures through ``ctx`` (:class:`Context`: ``ctx.emit`` for every figure, ``ctx.target`` for
a target's figure and pass/miss, ``ctx.time_ms`` / ``ctx.gpu_ms`` / ``ctx.peak_mb`` to time,
``ctx.smoke`` for tiny shapes), then add ``Part("x", est_s, part_x, targets=(...))`` to
:data:`PARTS` at its place in value order and any new target to :data:`TARGETS`. It must run
under ``--smoke`` on the CPU (``tests/test_run_gpu_plan.py`` runs every part so).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

T_START = time.perf_counter()  # the budget counts from here (imports and CUDA start included)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BUDGET_S = 480
# python + torch import, CUDA context, the environment record; before the first part
STARTUP_S = 20
ETA = 0.06


# ============================================================================= targets
@dataclasses.dataclass(frozen=True)
class Target:
    id: str
    text: str
    goal: str


TARGETS = {t.id: t for t in [
    Target("linear_correct", "Linear: fused / generate / reference / mixed vs float64 reference, "
           "fwd + dX, dW, db, bf16 fp16 fp32, N=K=4096 M 1..8192 and odd shapes", "worst err ratio <= 1"),
    Target("conv_correct", "Conv2d: fused / generate / reference, 53 ResNet-50 convs, batch 1 and 32, "
           "fwd + every grad, bf16 fp16 fp32, channels_last", "worst err ratio <= 1"),
    Target("noise_contract", "noise read back from the kernels (matmul fwd/dX, split-K, generate, "
           "conv) equals rng.normal_grid", "max |err| <= 2e-5"),
    Target("noise_moments", "read-back noise: mean, var, skew, kurtosis in standard errors", "< 6"),
    Target("noise_ks", "read-back noise: Kolmogorov-Smirnov p vs N(0, 1)", "> 1e-3"),
    Target("linear_vs_naive", "Linear 4096 bf16, every M, fwd and fwd+bwd: auto / naive "
           "x @ (w + s*randn_like(w)).t()", "< 1 (worst)"),
    Target("linear_vs_aihwkit", "Linear 4096 bf16, every M, fwd and fwd+bwd: auto / "
           "aihwkit-lightning AnalogLinear (ADD_NORMAL)", "< 1 (worst)"),
    Target("linear_small_m_vs_clean", "Linear 4096 bf16 fwd, M <= 64: auto / clean cuBLAS", "<= 1.5 (worst)"),
    Target("linear_large_m_vs_clean", "Linear 4096 bf16 fwd, M = 8192: auto / clean cuBLAS", "<= 1.10"),
    Target("mlp_peak_memory", "16-layer 4096-wide MLP train step bf16: peak memory fastnoise / clean",
           "<= 1.05"),
    Target("rn50_kd_vs_clean", "ResNet-50 b128 bf16 channels_last: KD + noise step / clean student step",
           "<= 1.33"),
    Target("rn50_kd_vs_naive", "ResNet-50 b128: fastnoise KD + noise step / naive KD + noise step", "< 1"),
    Target("rn50_kd_memory", "ResNet-50 b128: peak memory fastnoise KD / naive KD", "< 1"),
    Target("conv_layer_vs_cudnn", "ResNet-50 per-layer noisy conv, batch 1 and 8, bf16 channels_last: "
           "auto / cuDNN (GPU time)", "<= 1.5 (worst layer)"),
    Target("robustness_vs_naive", "ResNet-50 10-draw robustness pass: best fastnoise / 10 naive passes",
           "< 1 (worst batch)"),
    Target("pcm_correct", "PCM chip weight, fused Triton kernels vs the PyTorch reference chip "
           "(same normals), 4096 x 4096 and odd shapes, t = 1 s .. 1 year", "max |err| / max|W| <= 2e-6"),
    Target("pcm_fused_vs_composition", "PCM chip weight 4096 x 4096 (and a ResNet-50 conv): fused "
           "Triton kernels / the PyTorch composition on Triton normals", "< 1 (worst)"),
    Target("fused_max_m", "Linear crossover fused vs generate (fwd+bwd, bf16): largest M where "
           "fused wins", "sets FUSED_MAX_M"),
    Target("fused_max_output_pixels", "Conv crossover fused vs generate (GPU time, bf16): largest "
           "output pixels where fused wins", "sets FUSED_MAX_OUTPUT_PIXELS"),
    Target("fused_min_weight_numel", "Conv crossover: smallest weight where fused wins at the "
           "smallest output", "sets FUSED_MIN_WEIGHT_NUMEL"),
    Target("tile_fused_agrees", "crossbar tile Linear (8-bit DAC/ADC, bound per channel, output "
           "noise) bf16: fused Triton kernel vs the torch composition, same noise: share of outputs "
           "apart by more than one bf16 ulp (none by more than an ADC step per tile)", "<= 0.01"),
    Target("tile_fused_vs_composition", "crossbar tile Linear bf16, 1024 M=256 and 4096 M=2048, "
           "fwd and fwd+bwd: fused kernel / torch composition", "< 1 (worst)"),
]}


# ============================================================================= context
class PartTimeout(Exception):
    """Raised inside a part when it runs past its cap or the budget (SIGALRM)."""


def _to_json(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Context:
    """What a part measures with and reports through.

    ``emit`` writes one figure (one line of ``results.jsonl``, flushed); ``target`` writes a
    target's figure and pass/miss (``ok`` is not judged in smoke runs). ``time_ms`` / ``gpu_ms`` /
    ``peak_mb`` time on the GPU as METHOD.md says (wall clock on the CPU in smoke runs).
    """

    def __init__(self, out_dir: str | None, smoke: bool, device: str, log=print, t0: float | None = None):
        self.out_dir, self.smoke, self.device, self.log = out_dir, smoke, device, log
        self.part = None
        self.rows: list[dict] = []
        self.targets: dict[str, dict] = {}
        self.t0 = time.perf_counter() if t0 is None else t0  # what t_s and the budget count from
        self._file = open(os.path.join(out_dir, "results.jsonl"), "a") if out_dir else None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def pick(self, full, smoke):
        return smoke if self.smoke else full

    def write(self, record: dict) -> None:
        record = {k: _to_json(v) for k, v in record.items()}
        record["t_s"] = round(time.perf_counter() - self.t0, 3)
        if self._file is not None:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()

    def emit(self, case: str, metric: str, value, **extra) -> dict:
        row = {"kind": "row", "part": self.part, "case": case, "metric": metric, "value": value, **extra}
        self.rows.append(row)
        self.write(row)
        return row

    def target(self, tid: str, value, ok: bool | None, note: str = "") -> None:
        if tid not in TARGETS:
            raise KeyError(f"unknown target {tid!r}; add it to TARGETS")
        rec = {"kind": "target", "part": self.part, "id": tid, "value": value,
               "ok": None if self.smoke or ok is None else bool(ok), "goal": TARGETS[tid].goal, "note": note}
        self.targets[tid] = rec
        self.write(rec)
        self.log(f"  [target] {tid} = {_fmt(value)} ({TARGETS[tid].goal}) "
                 f"{_verdict(rec['ok'])} {note}".rstrip())

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def time_ms(self, fn, grad_to_none=None, long_calls: int = 5) -> float:
        """Median ms of ``fn()`` after one untimed call (compiling, autotuning).

        CUDA: ``do_bench`` (events, median) for calls under 5 ms, else ``long_calls`` calls timed
        one by one, synchronized. CPU (smoke): the wall clock of one call (meaningless: the code ran).
        """
        fn()
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        once = (time.perf_counter() - t) * 1e3
        if once < 5.0:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=25, grad_to_none=grad_to_none,
                                                 return_mode="median"))
        times = []
        for _ in range(long_calls):
            if grad_to_none:
                for x in grad_to_none:
                    x.grad = None
            t = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def gpu_ms(self, fn):
        """Median GPU ms from CUDA-graph replays (no launch overhead); None on the CPU or when
        ``fn`` cannot be captured."""
        if not self.cuda:
            return None
        import triton.testing

        fn()
        self.sync()
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
        except Exception as e:  # host syncs or allocations a graph cannot hold
            self.log(f"  (no CUDA graph: {type(e).__name__}: {str(e)[:80]})")
            return None

    def peak_mb(self, fn, repeats: int = 1):
        """Peak allocated MiB over ``repeats`` calls of ``fn`` (None on the CPU)."""
        if not self.cuda:
            fn()
            return None
        import torch

        self.sync()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            fn()
        self.sync()
        return torch.cuda.max_memory_allocated() / 2**20

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _verdict(ok) -> str:
    return {True: "pass", False: "MISS", None: "n/a"}[ok]


# ============================================================================= autotune lists
# (BM, BP, BR) of noisy_matmul, (BM, BN, BK) of noisy_conv. "time": the configs kept for the
# timing parts (with the kernels' pruning, small M keeps one, so no autotuning; large M two or
# three). "check": one config for the correctness parts, one of the timing list, so that the
# correctness matrix (3 dtypes x kernel sizes x split-K) compiles each variant once.
TUNING = {
    "time": {"noisy_matmul": ((16, 64, 64), (64, 64, 64), (128, 128, 32)),
             "noisy_conv": ((16, 64, 32), (64, 64, 32), (64, 128, 32))},
    "check": {"noisy_matmul": ((64, 64, 64),), "noisy_conv": ((64, 64, 32),)},
}
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 20
_tuning = {"mode": None, "lists": {}}


def _kernels() -> dict:
    from fastnoise.kernels import noisy_conv, noisy_matmul

    return {"noisy_matmul": (noisy_matmul._noisy_matmul_kernel, ("BM", "BP", "BR")),
            "noisy_conv": (noisy_conv._noisy_conv_fwd_kernel, ("BM", "BN", "BK"))}


def short_autotune() -> dict:
    """Build the "check" and "time" lists of :data:`TUNING` from each kernel's own list (in its
    order; its first one or two configs where none match), shorten the autotuner's timing and
    switch to "time". Returns the lists, for the environment record. No-op under the
    interpreter (one config per kernel there)."""
    from fastnoise import dispatch

    if dispatch.triton_interpret():
        return {"interpreter": "one config per kernel"}
    import triton.testing

    for name, (kern, keys) in _kernels().items():
        for mode, want in TUNING.items():
            configs = [c for c in kern.configs if tuple(c.kwargs.get(k) for k in keys) in want[name]]
            _tuning["lists"][(mode, name)] = configs or list(kern.configs[:len(want[name])])
        if hasattr(kern, "_do_bench"):
            kern._do_bench = lambda call, quantiles: triton.testing.do_bench(
                call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)
    use_tuning("time")
    return {f"{mode} {name}": [str(c) for c in v] for (mode, name), v in _tuning["lists"].items()}


def use_tuning(mode: str) -> None:
    """Give each kernel the "check" or "time" list (its choices forgotten when it changes)."""
    if not _tuning["lists"] or _tuning["mode"] == mode:
        return
    for name, (kern, _) in _kernels().items():
        kern.configs = list(_tuning["lists"][(mode, name)])
        kern.cache.clear()
    _tuning["mode"] = mode


def autotune_choices() -> dict:
    """What the autotuners picked, per key (for the summary)."""
    try:
        from fastnoise.kernels import noisy_conv, noisy_matmul
    except ImportError:
        return {}
    return {name: {str(k): str(v) for k, v in getattr(kern, "cache", {}).items()}
            for name, kern in (("noisy_matmul", noisy_matmul._noisy_matmul_kernel),
                               ("noisy_conv", noisy_conv._noisy_conv_fwd_kernel))}


# ============================================================================= parts
DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def _dname(dtype) -> str:
    return DTYPE_NAMES.get(str(dtype), str(dtype))


def part_linear_correctness(ctx: Context) -> None:
    """Every linear path vs the float64 reference: output and dX, dW, db (bias with noise)."""
    import torch

    from bench import gpu_linear

    full = [((m,), 4096, 4096) for m in (1, 16, 64, 256, 2048, 8192)] + [((3, 41), 401, 1271),
                                                                          ((7,), 1271, 4091)]
    shapes = ctx.pick(full, [((3,), 32, 24), ((2, 3), 40, 21)])
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # most used first
        for lead, k, n in shapes:
            for path in ("fused", "generate"):
                cases.append((lead, k, n, dtype, path, None))
        lead, k, n = shapes[-1]
        cases.append((lead, k, n, dtype, "reference", None))
    lead, k, n = shapes[1] if ctx.smoke else ((16,), 4096, 4096)
    cases += [(lead, k, n, torch.bfloat16, "auto", None), (lead, k, n, torch.bfloat16, "fused", "generate"),
              (lead, k, n, torch.bfloat16, "generate", "fused")]
    worst = (0.0, None)
    for lead, k, n, dtype, path, bpath in cases:
        ratio = gpu_linear.check_case(lead, k, n, dtype, path, bpath, ctx.device)
        label = path if bpath is None else f"{path}+bwd:{bpath}"
        case = f"{label} {_dname(dtype)} {gpu_linear._shape_name(lead, k, n)}"
        ctx.emit(case, "max_err_ratio", ratio, ok=ratio <= 1)
        worst = max(worst, (ratio, case), key=lambda v: v[0])
    ctx.target("linear_correct", worst[0], worst[0] <= 1, f"worst: {worst[1]}; {len(cases)} cases")


def part_conv_correctness(ctx: Context) -> None:
    """Fused and generate conv vs the float64 reference on every distinct ResNet-50 conv."""
    import torch

    from bench import gpu_conv
    from fastnoise import NoiseSpec

    dev = torch.device(ctx.device)
    shapes = ctx.pick(gpu_conv.distinct_shapes(gpu_conv.resnet50_conv_shapes()), gpu_conv._quick_shapes())
    spec = NoiseSpec(0.1, "absmax_per_channel", noise_bias=True)
    worst, count = (0.0, None), 0
    for batch in ctx.pick((1, 32), (1,)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for path in ("fused", "generate", "reference"):
                if path == "reference" and batch != 1:
                    continue
                ratios = {str(s): gpu_conv.check_conv(s, batch, dtype, path, spec, dev) for s in shapes}
                count += len(ratios)
                bad = max(ratios, key=ratios.get)
                case = f"rn50 convs b{batch} {_dname(dtype)} {path}"
                ctx.emit(case, "max_err_ratio", ratios[bad], ok=ratios[bad] <= 1, worst_shape=bad,
                         ratios=ratios)
                worst = max(worst, (ratios[bad], f"{case} {bad}"), key=lambda v: v[0])
    ctx.target("conv_correct", worst[0], worst[0] <= 1, f"worst: {worst[1]}; {count} checks")


def _moments(z) -> dict:
    import numpy as np
    from scipy import stats

    n = z.size
    return {"mean": abs(z.mean()) / np.sqrt(1 / n), "var": abs(z.var() - 1) / np.sqrt(2 / n),
            "skew": abs(stats.skew(z)) / np.sqrt(6 / n), "kurtosis": abs(stats.kurtosis(z)) / np.sqrt(24 / n)}


def part_noise_readback(ctx: Context) -> None:
    """z read back from each kernel: matmul forward (I @ z^T) and dX (I @ z), whole and split-K;
    the generate kernel (W = 0, sigma = 1); the fused conv (1x1 conv of one-hot images).
    float32 with IEEE products, so each output is one z. Against rng.normal_grid, then the
    moments and KS of the matmul's draws."""
    import torch
    from fastnoise.kernels import noise_gen, noisy_conv, noisy_matmul
    from scipy import stats

    from fastnoise import rng

    seed, offset = 0x5EED_1234_ABCD, 3
    dev = ctx.device
    n, k = ctx.pick((2048, 2048), (24, 256))
    sigma = torch.ones(1, device=dev)
    off = torch.tensor(offset, device=dev)
    want = rng.normal_grid(seed, offset, n, k, device=dev)
    w = torch.zeros(n, k, device=dev)
    errs = {}
    with _tf32(False):
        for split in (1, 4):
            zf = noisy_matmul.noisy_matmul_fwd(torch.eye(k, device=dev), w, None, sigma, 0, False, seed, off,
                                               split_k=split).t()
            zb = noisy_matmul.noisy_matmul_dx(torch.eye(n, device=dev), w, sigma, 0, seed, off, split_k=split)
            errs[f"matmul fwd split_k={split}"] = (zf - want).abs().max().item()
            errs[f"matmul dX split_k={split}"] = (zb - want).abs().max().item()
        zg = noise_gen.noisy_weight(w, sigma, 0, seed, off, torch.float32)
        errs["generate"] = (zg - want).abs().max().item()
        cin, cout = ctx.pick((512, 256), (20, 12))
        wc = torch.zeros(cout, cin, 1, 1, device=dev)
        xc = torch.eye(cin, device=dev).reshape(cin, cin, 1, 1)
        yc = noisy_conv.noisy_conv2d_fwd(xc, wc, None, sigma, 0, False, seed, off, (1, 1), (0, 0), (1, 1), 1)
        errs["conv 1x1 fused"] = (yc.reshape(cin, cout).t() - rng.normal_grid(seed, offset, cout, cin,
                                                                            device=dev)).abs().max().item()
    for case, e in errs.items():
        ctx.emit(f"z {case}", "max_abs_err", e, ok=e <= 2e-5)
    worst = max(errs, key=errs.get)
    ctx.target("noise_contract", errs[worst], errs[worst] <= 2e-5, f"worst: {worst}")
    z = zf.double().flatten().cpu().numpy()
    m = _moments(z)
    for name, v in m.items():
        ctx.emit(f"z matmul fwd {z.size} draws", f"{name}_std_errors", v)
    bad = max(m, key=m.get)
    ctx.target("noise_moments", m[bad], m[bad] < 6, f"worst: {bad}; {z.size} draws")
    p = stats.kstest(z, "norm").pvalue
    ctx.target("noise_ks", p, p > 1e-3, f"{z.size} draws")


@contextlib.contextmanager
def _tf32(on: bool):
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def aihwkit_linear(w):
    """aihwkit-lightning's AnalogLinear with ``w`` and training-time weight noise (ADD_NORMAL,
    std ``ETA`` relative to max |w|), the IO left ideal; or the reason it cannot be built."""
    try:
        from aihwkit_lightning.nn import AnalogLinear
        from aihwkit_lightning.simulator.configs import TorchInferenceRPUConfig, WeightModifierType
    except Exception as e:  # not installed, or an incompatible version
        return None, f"aihwkit-lightning not importable ({type(e).__name__}: {str(e)[:60]})"
    try:
        import torch

        rpu = TorchInferenceRPUConfig()
        try:  # 2.x names the noise apart from the quantization
            from aihwkit_lightning.simulator.configs import WeightNoiseInjectionType

            rpu.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL
        except ImportError:
            rpu.modifier.type = WeightModifierType.ADD_NORMAL
        rpu.modifier.std_dev = ETA
        for attr, value in (("inp_res", -1), ("out_res", -1), ("out_noise", 0.0), ("out_bound", -1)):
            if hasattr(rpu.forward, attr):
                setattr(rpu.forward, attr, value)
        layer = AnalogLinear(w.shape[1], w.shape[0], bias=False, rpu_config=rpu)
        layer = layer.to(device=w.device, dtype=w.dtype).train()
        with torch.no_grad():
            layer.weight.copy_(w)
        return layer, ""
    except Exception as e:
        return None, f"aihwkit-lightning layer failed ({type(e).__name__}: {str(e)[:60]})"


def part_linear_timing(ctx: Context) -> None:
    """Linear N = K = 4096 bf16 at each M: clean, naive, fastnoise auto / fused / generate and
    aihwkit-lightning, forward and forward + backward, medians side by side."""
    import torch

    from bench import gpu_linear
    from fastnoise import NoiseSpec

    dev, bf16 = ctx.device, torch.bfloat16
    n = k = ctx.pick(4096, 32)
    ms_list = ctx.pick((1, 16, 64, 256, 2048, 8192), (1, 5))
    spec = NoiseSpec(ETA, "range")
    w0 = (torch.randn(n, k, device=dev) / k**0.5).to(bf16)
    ai_layer, ai_why = aihwkit_linear(w0)
    if ai_layer is None:
        ctx.emit("aihwkit-lightning", "unavailable", ai_why)
    vs_naive, vs_ai, small, large = [], [], [], []
    for m in ms_list:
        x = torch.randn(m, k, device=dev).to(bf16).requires_grad_()
        w = w0.clone().requires_grad_()
        g = torch.randn(m, n, device=dev).to(bf16)
        fns = gpu_linear.providers(x, w, spec, dev)
        if ai_layer is not None:
            fns["aihwkit"] = lambda x=x: ai_layer(x)
        res = {}
        for name, f in fns.items():
            reset = [x, w] + ([ai_layer.weight] if name == "aihwkit" else [])
            res[("fwd", name)] = ctx.time_ms(f)
            res[("fwd+bwd", name)] = ctx.time_ms(lambda f=f, g=g: f().backward(g), grad_to_none=reset)
        for (mode, name), v in res.items():
            ctx.emit(f"bf16 M={m} N=K={n} {mode} {name}", "ms", v, M=m, mode=mode, provider=name)
        for mode in ("fwd", "fwd+bwd"):
            r = res[(mode, "auto")] / res[(mode, "naive")]
            ctx.emit(f"bf16 M={m} {mode} auto/naive", "ratio", r)
            vs_naive.append((r, f"M={m} {mode}"))
            if ai_layer is not None:
                r = res[(mode, "auto")] / res[(mode, "aihwkit")]
                ctx.emit(f"bf16 M={m} {mode} auto/aihwkit", "ratio", r)
                vs_ai.append((r, f"M={m} {mode}"))
        r = res[("fwd", "auto")] / res[("fwd", "clean")]
        ctx.emit(f"bf16 M={m} fwd auto/clean", "ratio", r)
        if m <= 64:
            small.append((r, f"M={m}"))
        if m == max(ms_list):
            large.append((r, f"M={m}"))
        del x, w, g, fns
    worst = max(vs_naive)
    ctx.target("linear_vs_naive", worst[0], worst[0] < 1, f"worst at {worst[1]}")
    if vs_ai:
        worst = max(vs_ai)
        ctx.target("linear_vs_aihwkit", worst[0], worst[0] < 1, f"worst at {worst[1]}")
    else:
        ctx.target("linear_vs_aihwkit", None, None, ai_why)
    worst = max(small)
    ctx.target("linear_small_m_vs_clean", worst[0], worst[0] <= 1.5, f"worst at {worst[1]}")
    ctx.target("linear_large_m_vs_clean", large[0][0], large[0][0] <= 1.10, large[0][1])


def part_ceilings(ctx: Context) -> None:
    """The two ceilings (METHOD.md) and the RNG rate: device-to-device copy GB/s (bytes read +
    written), bf16 matmul TFLOP/s on random data, normals/s of the generation kernel (W + sigma z
    of a bf16 weight, read and written) against torch.randn_like, all in this run."""
    import torch
    from fastnoise.kernels import noise_gen

    dev, bf16 = ctx.device, torch.bfloat16
    big = ctx.pick(2**28, 2**12)  # bf16 elements: 512 MiB, several times the L2
    a = torch.randn(big, device=dev).to(bf16)
    ms = ctx.time_ms(lambda a=a: a.clone())
    ctx.emit(f"copy {a.numel() * 2 / 2**20:.0f} MiB bf16", "GB_per_s", 2 * a.numel() * 2 / (ms * 1e-3) / 1e9)
    del a
    s = ctx.pick(8192, 64)
    x, y = torch.randn(s, s, device=dev).to(bf16), torch.randn(s, s, device=dev).to(bf16)
    ms = ctx.time_ms(lambda: x @ y)
    ctx.emit(f"bf16 matmul {s}^3 random", "TFLOP_per_s", 2 * s**3 / (ms * 1e-3) / 1e12)
    w = (x / s**0.5).contiguous()
    sigma = torch.full((1,), 0.01, device=dev)
    off = torch.tensor([3], device=dev)
    t = {"noise_gen": ctx.time_ms(lambda: noise_gen.noisy_weight(w, sigma, 0, 7, off, bf16)),
         "randn_like": ctx.time_ms(lambda: torch.randn_like(w)), "copy": ctx.time_ms(lambda: w.clone())}
    for name in ("noise_gen", "randn_like"):
        ctx.emit(f"bf16 {s}x{s} {name}", "G_normals_per_s", w.numel() / (t[name] * 1e-3) / 1e9)
    ctx.emit(f"bf16 {s}x{s} noise_gen / copy", "time_ratio", t["noise_gen"] / t["copy"])


def part_mlp_memory(ctx: Context) -> None:
    """One training step of a 16-layer 4096-wide MLP (bf16, 4096 tokens): peak memory and time of
    clean, naive and fastnoise, and the bytes autograd saves for backward."""
    import torch

    from bench import gpu_linear

    width, depth, tokens = ctx.pick((4096, 16, 4096), (64, 4, 32))
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    peaks, times = {}, {}
    for kind in ("clean", "naive", "fastnoise"):
        torch.manual_seed(0)
        model = gpu_linear.mlp(kind, width, depth, ctx.device, dtype)
        x = torch.randn(tokens, width, device=ctx.device, dtype=dtype)
        ctx.emit(f"MLP {depth}x{width} {kind}", "saved_mb", gpu_linear.saved_bytes(model, x) / 2**20)
        gpu_linear.train_step(model, x)  # .grad allocated, kernels compiled
        peaks[kind] = ctx.peak_mb(lambda m=model, x=x: gpu_linear.train_step(m, x))
        times[kind] = ctx.time_ms(lambda m=model, x=x: gpu_linear.train_step(m, x))
        ctx.emit(f"MLP {depth}x{width} tokens={tokens} {kind}", "peak_mb", peaks[kind])
        ctx.emit(f"MLP {depth}x{width} tokens={tokens} {kind}", "step_ms", times[kind])
        del model, x
        ctx.free()
    ctx.emit("MLP fastnoise / clean", "step_time_ratio", times["fastnoise"] / times["clean"])
    if peaks["clean"]:
        r = peaks["fastnoise"] / peaks["clean"]
        ctx.target("mlp_peak_memory", r, r <= 1.05, f"{peaks['fastnoise']:.0f} / {peaks['clean']:.0f} MiB; "
                   f"naive {peaks['naive'] / peaks['clean']:.3f}x")
    else:
        ctx.target("mlp_peak_memory", None, None, "no CUDA: peak memory not measured")


def part_resnet50_step(ctx: Context) -> None:
    """ResNet-50 batch 128 bf16 autocast channels_last SGD: clean student, naive KD + noise
    (forward pre-hooks), fastnoise KD + noise; step time and peak memory."""
    import torch

    from bench import gpu_conv

    dev = torch.device(ctx.device)
    batch = ctx.pick(128, 2)
    res = {}
    for kind in ("clean", "naive_kd", "fastnoise_kd"):
        step = gpu_conv.make_step(kind, batch, ctx.smoke, dev)
        step()  # compile, cuDNN plans, allocator
        mem = ctx.peak_mb(step)
        ms = ctx.time_ms(step, long_calls=ctx.pick(7, 2))
        res[kind] = (ms, mem)
        ctx.emit(f"rn50 b{batch} step {kind}", "ms", ms)
        ctx.emit(f"rn50 b{batch} step {kind}", "images_per_s", batch / ms * 1e3)
        ctx.emit(f"rn50 b{batch} step {kind}", "peak_mb", mem)
        del step
        ctx.free()
    (kd, kd_mem), (naive, naive_mem), (clean, _) = res["fastnoise_kd"], res["naive_kd"], res["clean"]
    ctx.target("rn50_kd_vs_clean", kd / clean, kd / clean <= 1.33, f"{kd:.1f} / {clean:.1f} ms")
    ctx.target("rn50_kd_vs_naive", kd / naive, kd < naive, f"{kd:.1f} / {naive:.1f} ms")
    if kd_mem is not None:
        ctx.target("rn50_kd_memory", kd_mem / naive_mem, kd_mem < naive_mem,
                   f"{kd_mem:.0f} / {naive_mem:.0f} MiB")
    else:
        ctx.target("rn50_kd_memory", None, None, "no CUDA: peak memory not measured")


def part_conv_per_layer(ctx: Context) -> None:
    """Each ResNet-50 conv (distinct shapes, weighted by count) at batch 1 and 8, bf16
    channels_last: clean cuDNN and fastnoise auto, eager medians and GPU time (graphs). (The
    naive layer is timed in the step and robustness parts.)"""
    import torch

    from bench import gpu_conv

    dev = torch.device(ctx.device)
    shapes = gpu_conv.resnet50_conv_shapes() if not ctx.smoke else gpu_conv._quick_shapes()
    counts = gpu_conv.count_of(shapes)
    worst = (0.0, None)
    for batch in ctx.pick((1, 8), (1,)):
        total = {}
        for shape in counts:
            fns = {p: gpu_conv.layer_fn(shape, batch, p, dev) for p in ("clean", "auto")}
            eager = {p: ctx.time_ms(f) for p, f in fns.items()}
            graph = {p: ctx.gpu_ms(fns[p]) for p in ("clean", "auto")}
            basis, kind = (graph, "gpu") if None not in graph.values() else (eager, "eager")
            r = basis["auto"] / basis["clean"]
            ctx.emit(f"b{batch} {shape} auto/clean ({kind})", "ratio", r, eager_ms=eager, gpu_ms=graph,
                     count=counts[shape])
            worst = max(worst, (r, f"b{batch} {shape} ({kind})"), key=lambda v: v[0])
            for p, v in eager.items():
                total[p] = total.get(p, 0.0) + counts[shape] * v
        for p, v in total.items():
            ctx.emit(f"rn50 convs b{batch} sum {p} (eager)", "ms", v)
    ctx.target("conv_layer_vs_cudnn", worst[0], worst[0] <= 1.5, f"worst: {worst[1]}")


def part_robustness(ctx: Context) -> None:
    """ResNet-50 eval, 10 draws x 8 batches, batch 1 and 8: naive hooks (noise at every
    forward), weights perturbed once per draw, fastnoise noise(draw=k), the same pregenerated."""
    import torch

    from bench import gpu_conv

    dev = torch.device(ctx.device)
    draws, per_draw = ctx.pick((gpu_conv.DRAWS, gpu_conv.BATCHES_PER_DRAW), (2, 2))
    worst = (0.0, None)
    for batch in ctx.pick((8, 1), (1,)):
        t = {}
        for kind in ("naive", "naive_perturb", "fastnoise", "fastnoise_pregenerated"):
            fn = gpu_conv.make_robustness(kind, batch, ctx.smoke, dev, draws, per_draw)
            t[kind] = ctx.time_ms(fn, long_calls=3)
            ctx.emit(f"rn50 eval b{batch} {draws} draws x {per_draw} batches {kind}", "ms", t[kind])
            del fn
            ctx.free()
        best = min(t["fastnoise"], t["fastnoise_pregenerated"])
        r = best / t["naive"]
        ctx.emit(f"rn50 eval b{batch} best fastnoise / naive_perturb", "ratio", best / t["naive_perturb"])
        worst = max(worst, (r, f"batch {batch}"), key=lambda v: v[0])
    ctx.target("robustness_vs_naive", worst[0], worst[0] < 1, f"worst at {worst[1]}")


def part_pcm_chip(ctx: Context) -> None:
    """A PCM chip's effective weight: the two Triton launches of kernels/pcm_chip.py against the
    reference chip (correctness) and against the PyTorch composition on Triton normals (time)."""
    import torch

    from fastnoise import PCM
    from fastnoise._hardware_ops import _pcm_triton, _triton_normal
    from fastnoise.hardware import reference_normal

    dev = torch.device(ctx.device)
    pcm = PCM()
    g = torch.Generator(device=dev).manual_seed(0)
    worst = 0.0
    for shape in ctx.pick(((4096, 4096), (2048, 512, 3, 3), (37, 301)), ((37, 301),)):
        w = torch.randn(*shape, generator=g, device=dev) * 0.05
        for t in (1.0, 86400.0, 3.15e7):
            got = _pcm_triton(pcm, w, 12345, 3, t, 7)
            ref = pcm.effective_weight(w, 12345, 3, t, 7, normal=reference_normal)
            worst = max(worst, float((got - ref).abs().max() / w.abs().max()))
    ctx.emit("pcm chip fused vs reference", "max err / max|W|", worst)
    ctx.target("pcm_correct", worst, worst <= 2e-6)
    ratio = (0.0, None)
    for shape in ctx.pick(((4096, 4096), (2048, 512, 3, 3)), ((64, 256),)):
        w = torch.randn(*shape, generator=g, device=dev) * 0.05
        fused = ctx.time_ms(lambda w=w: _pcm_triton(pcm, w, 1, 2, 3600.0, 0))
        comp = ctx.time_ms(lambda w=w: pcm.effective_weight(w, 1, 2, 3600.0, 0, normal=_triton_normal))
        ctx.emit(f"pcm chip {list(shape)} fused", "ms", fused)
        ctx.emit(f"pcm chip {list(shape)} composition", "ms", comp)
        ratio = max(ratio, (fused / comp, str(list(shape))), key=lambda v: v[0])
        ctx.free()
    ctx.target("pcm_fused_vs_composition", ratio[0], ratio[0] < 1, f"worst at {ratio[1]}")


def _largest_prefix_win(points) -> int:
    """Largest x such that fused won at every measured x' <= x (0: it never won first)."""
    best = 0
    for x, fused, gen in sorted(points):
        if fused > gen:
            break
        best = x
    return best


def part_tile_timing(ctx: Context) -> None:
    """The crossbar tile's Linear (issue 19) on the fused kernel (kernels/tile_matmul.py) against
    its torch composition and the plain noisy layer, bf16: first the two tile forwards on the same
    noise (how many outputs differ, by how much in ADC steps), then forward and forward +
    backward medians side by side. Noise drawn in the kernel at M <= 64, read generated above."""
    import torch
    from fastnoise.kernels import tile_matmul

    from fastnoise import NoiseSpec, tile_ops
    from fastnoise.functional import noisy_linear
    from fastnoise.tile import TileSpec

    dev, bf16 = ctx.device, torch.bfloat16
    shapes = ctx.pick([(256, 1024, 1024), (2048, 4096, 4096)], [(5, 70, 9)])
    tile = TileSpec(max_input_size=ctx.pick(512, 32), inp_bits=8, out_bits=8, out_bound=10.0,
                    bound_per_channel=True, out_noise=0.04, init_from_data=0)
    spec, seed = NoiseSpec(ETA, "absmax_per_channel"), 0x7115
    off = torch.tensor(3, device=dev)
    old = tile_ops.TILE_FORWARD
    worst_share, ratios = (-1.0, None), []
    try:
        for m, k, n in shapes:
            x = torch.randn(m, k, device=dev).to(bf16).requires_grad_()
            w = (torch.randn(n, k, device=dev) / k**0.5).to(bf16).requires_grad_()
            r = torch.full((len(tile.sizes(k)),), 3.0, device=dev).requires_grad_()
            g = torch.randn(m, n, device=dev).to(bf16)
            name = f"bf16 M={m} K={k} N={n} tiles of {tile.max_input_size}"

            def run(how, x=x, w=w, r=r):
                tile_ops.TILE_FORWARD = how
                return tile_ops.tile_linear(x, w, None, r, tile, spec, seed, off)

            with torch.no_grad():
                yf, yc = run("fused").float(), run("composition").float()
            q = tile_matmul.tile_tables(tile, w.detach(), r.detach(), bf16, k)["qstep"].sum(0)
            scale = max(1.0, yc.abs().max().item())
            diff = (yf - yc).abs()
            share = (diff > torch.finfo(bf16).eps * scale).float().mean().item()
            steps = (diff / q.clamp_min(1e-30)).max().item()
            ok = share <= 0.01 and bool((diff <= q + 2 * torch.finfo(bf16).eps * scale).all())
            ctx.emit(f"{name} fused vs composition", "share_apart", share, ok=ok, max_adc_steps=steps)
            worst_share = max(worst_share, (share if ok else float("inf"), name), key=lambda v: v[0])
            fns = {"fused": lambda: run("fused"), "composition": lambda: run("composition"),
                   "noisy_linear": lambda x=x, w=w: noisy_linear(x, w, None, spec, seed, off)}
            res = {}
            for prov, f in fns.items():
                res[("fwd", prov)] = ctx.time_ms(f)
                res[("fwd+bwd", prov)] = ctx.time_ms(lambda f=f, g=g: f().backward(g),
                                                     grad_to_none=[x, w, r])
            for (mode, prov), v in res.items():
                ctx.emit(f"{name} {mode} {prov}", "ms", v, M=m, mode=mode, provider=prov)
            for mode in ("fwd", "fwd+bwd"):
                ratio = res[(mode, "fused")] / res[(mode, "composition")]
                ctx.emit(f"{name} {mode} fused/composition", "ratio", ratio)
                ctx.emit(f"{name} {mode} fused/noisy_linear", "ratio",
                         res[(mode, "fused")] / res[(mode, "noisy_linear")])
                ratios.append((ratio, f"{name} {mode}"))
            del x, w, r, g, fns
            ctx.free()
    finally:
        tile_ops.TILE_FORWARD = old
    ctx.target("tile_fused_agrees", worst_share[0], worst_share[0] <= 0.01, f"worst: {worst_share[1]}")
    worst = max(ratios)
    ctx.target("tile_fused_vs_composition", worst[0], worst[0] < 1, f"worst at {worst[1]}")


def part_linear_crossover(ctx: Context) -> None:
    """Fused vs generate, bf16, forward and forward + backward, over M at N = K = 4096 and 1024:
    where ``FUSED_MAX_M`` belongs."""
    import torch

    from bench import gpu_linear
    from fastnoise import NoiseSpec
    from fastnoise import _backends_linear as backends

    dev, bf16 = ctx.device, torch.bfloat16
    spec = NoiseSpec(ETA, "range")
    suggest = {}
    for nk in ctx.pick((4096, 1024), (32,)):
        w = (torch.randn(nk, nk, device=dev) / nk**0.5).to(bf16).requires_grad_()
        points = []
        for m in ctx.pick((1, 16, 32, 64, 128, 256, 512, 1024, 2048), (1, 8)):
            x = torch.randn(m, nk, device=dev).to(bf16).requires_grad_()
            g = torch.randn(m, nk, device=dev).to(bf16)
            p = gpu_linear.providers(x, w, spec, dev)
            t = {}
            for name in ("fused", "generate"):
                t[name] = ctx.time_ms(lambda f=p[name], g=g: f().backward(g),
                                      grad_to_none=[x, w])
                t[name + "_fwd"] = ctx.time_ms(p[name])
            ctx.emit(f"N=K={nk} M={m}", "ms", None, **t)
            points.append((m, t["fused"], t["generate"]))
        suggest[nk] = _largest_prefix_win(points)
        ctx.emit(f"N=K={nk} fused wins fwd+bwd up to M", "M", suggest[nk])
        del w
    first = suggest[max(suggest)]
    ctx.target("fused_max_m", first, None, f"by N=K: {suggest}; now FUSED_MAX_M={backends.FUSED_MAX_M}")


def part_conv_crossover(ctx: Context) -> None:
    """Fused vs generate conv forward, bf16 channels_last, GPU time (graphs), over weight sizes
    (3x3 with 16..512 channels, 1x1 with 256 and 1024) and output pixels (7x7 outputs, batch
    1..16: 49..784 pixels): where ``FUSED_MAX_OUTPUT_PIXELS`` and ``FUSED_MIN_WEIGHT_NUMEL`` belong."""
    import torch

    from bench import gpu_conv
    from fastnoise import _backends_conv as backends

    dev = torch.device(ctx.device)
    weights = ctx.pick([(c, 3) for c in (16, 32, 64, 128, 256, 512)] + [(256, 1), (1024, 1)],
                       [(4, 3), (8, 1)])
    batches = ctx.pick((1, 2, 4, 8, 16), (1, 2))
    hw = ctx.pick(7, 3)
    wins_at = {}
    smallest = {}
    for c, k in weights:
        shape = gpu_conv.ConvShape(c, c, k, 1, hw)
        numel = c * c * k * k
        points = []
        for b in batches:
            t = {}
            for p in ("fused", "generate"):
                fn = gpu_conv.layer_fn(shape, b, p, dev)
                t[p] = ctx.gpu_ms(fn)
                if t[p] is None:  # the CPU, or not capturable: eager time
                    t[p] = ctx.time_ms(fn)
            pixels = b * hw * hw
            ctx.emit(f"{shape} b{b} pixels={pixels} numel={numel}", "ms", None, **t)
            points.append((pixels, t["fused"], t["generate"]))
        wins_at[numel] = _largest_prefix_win(points)
        smallest[numel] = points[0][1] <= points[0][2]
        ctx.emit(f"{shape} numel={numel} fused wins up to pixels", "pixels", wins_at[numel])
    winning = [n for n in sorted(smallest) if smallest[n]]
    min_numel = winning[0] if winning else None
    big = [v for n, v in wins_at.items() if min_numel is not None and n >= min_numel]
    ctx.target("fused_max_output_pixels", min(big) if big else 0, None,
               f"by weight numel: {wins_at}; now {backends.FUSED_MAX_OUTPUT_PIXELS}")
    ctx.target("fused_min_weight_numel", min_numel, None,
               f"fused wins at the smallest output for {winning}; now {backends.FUSED_MIN_WEIGHT_NUMEL}")


# Llama shapes (random weights; no download): about 60M, 350M and 1.2B parameters. The 1B one
# is Llama-3.2-1B's shape with untied embeddings.
DECODERS = {
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=32000),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                       num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}
DECODER_SMOKE = {"llama-tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128)}


def decoder(size: str, kind: str, device, dtype):
    """A random-weight ``LlamaForCausalLM`` of :data:`DECODERS` (or the smoke one): ``clean``,
    ``naive`` (forward pre-hooks w + s*randn_like(w) on every Linear) or ``fastnoise`` (convert)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastnoise
    from bench import gpu_conv

    shape = {**DECODERS, **DECODER_SMOKE}[size]
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False)
    with contextlib.suppress(Exception):  # the default elsewhere; the attribute moved between versions
        cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype)
    if kind == "naive":
        gpu_conv.NaiveWeightNoise(model)
    elif kind == "fastnoise":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the coverage warning names the embeddings
            fastnoise.convert(model, fastnoise.NoiseSpec(ETA, "range"))
    return model


def part_decoder_sweep(ctx: Context) -> None:
    """Llama decoders of growing size (random weights, bf16, batch 4 x 512 tokens): a training
    step (forward, backward; no optimizer) and an eval forward, clean / naive / fastnoise."""
    import torch

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    batch, seq = ctx.pick((4, 512), (2, 16))
    for size in ctx.pick(tuple(DECODERS), tuple(DECODER_SMOKE)):
        t = {}
        for kind in ("clean", "naive", "fastnoise"):
            model = decoder(size, kind, ctx.device, dtype).train()
            params = sum(p.numel() for p in model.parameters())
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=ctx.device)

            def step(model=model, ids=ids):
                model(input_ids=ids, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)

            def forward(model=model, ids=ids):
                with torch.inference_mode(), __import__("fastnoise").noise():
                    model(input_ids=ids)

            step()
            mem = ctx.peak_mb(step)
            t[kind] = ctx.time_ms(step, long_calls=3)
            model.eval()
            fwd = ctx.time_ms(forward, long_calls=3)
            ctx.emit(f"{size} ({params / 1e6:.0f}M) train step {kind}", "ms", t[kind], peak_mb=mem,
                     tokens_per_s=batch * seq / t[kind] * 1e3)
            ctx.emit(f"{size} eval forward {kind}", "ms", fwd)
            del model, step, forward
            ctx.free()
        ctx.emit(f"{size} train step fastnoise / clean", "ratio", t["fastnoise"] / t["clean"])
        ctx.emit(f"{size} train step fastnoise / naive", "ratio", t["fastnoise"] / t["naive"])


# ============================================================================= the registry
@dataclasses.dataclass(frozen=True)
class Part:
    """One step of the run: ``fn(ctx)`` measures, ``est_s`` is its estimated seconds on an H200
    (compilation and autotuning included; replace with the measured seconds of a run),
    ``targets`` the ids of :data:`TARGETS` it reports."""

    name: str
    est_s: float
    fn: Callable[[Context], None]
    targets: tuple = ()
    needs: tuple = ()  # importable modules it needs
    tuning: str = "time"  # which autotune lists of TUNING it runs with


# In order of value: correctness first, then the targets, then the sweeps. The plan keeps
# a prefix of this list; a later part never runs in place of an earlier one. Estimates: op counts
# over the measured ceilings plus ~2 s per Triton compile, not yet measured on a GPU.
PARTS = [
    Part("linear_correctness", 60, part_linear_correctness, ("linear_correct",), tuning="check"),
    Part("conv_correctness", 75, part_conv_correctness, ("conv_correct",), tuning="check"),
    Part("noise_readback", 12, part_noise_readback, ("noise_contract", "noise_moments", "noise_ks"),
         ("scipy",), tuning="check"),
    Part("tile_timing", 18, part_tile_timing, ("tile_fused_agrees", "tile_fused_vs_composition")),
    Part("linear_timing", 40, part_linear_timing, ("linear_vs_naive", "linear_vs_aihwkit",
                                                    "linear_small_m_vs_clean", "linear_large_m_vs_clean")),
    Part("mlp_memory", 15, part_mlp_memory, ("mlp_peak_memory",)),
    Part("resnet50_step", 30, part_resnet50_step, ("rn50_kd_vs_clean", "rn50_kd_vs_naive", "rn50_kd_memory"),
         ("torchvision",)),
    Part("conv_per_layer", 50, part_conv_per_layer, ("conv_layer_vs_cudnn",)),
    Part("robustness", 25, part_robustness, ("robustness_vs_naive",), ("torchvision",)),
    Part("pcm_chip", 12, part_pcm_chip, ("pcm_correct", "pcm_fused_vs_composition")),
    Part("linear_crossover", 25, part_linear_crossover, ("fused_max_m",)),
    Part("conv_crossover", 40, part_conv_crossover, ("fused_max_output_pixels", "fused_min_weight_numel")),
    Part("ceilings", 8, part_ceilings),
    Part("decoder_sweep", 50, part_decoder_sweep, (), ("transformers",)),
]


def part_cap_s(part: Part) -> float:
    """How long a part may run before it is stopped (its figures so far are kept)."""
    return max(1.5 * part.est_s, part.est_s + 30)


def select(parts, only=None, skip=None) -> list:
    names = [p.name for p in parts]
    for n in (only or []) + (skip or []):
        if n not in names:
            raise ValueError(f"unknown part {n!r}; parts are {', '.join(names)}")
    return [p for p in parts if (not only or p.name in only) and p.name not in (skip or [])]


def plan(budget_s: float, parts=None) -> tuple[list, list]:
    """``(kept, dropped)``: the longest prefix of ``parts`` (value order) whose estimates and the
    start-up fit in ``budget_s``; the rest is dropped."""
    parts = PARTS if parts is None else parts
    kept, used = [], STARTUP_S
    for i, p in enumerate(parts):
        if used + p.est_s > budget_s:
            return kept, list(parts[i:])
        kept.append(p)
        used += p.est_s
    return kept, []


def plan_text(budget_s, kept, dropped) -> str:
    lines = [f"plan for a budget of {budget_s:.0f} s (start-up {STARTUP_S} s):",
             f"  {'#':>2}  {'part':<20} {'est_s':>6} {'cum_s':>6} {'cap_s':>6}  targets"]
    cum = STARTUP_S
    for i, p in enumerate(kept, 1):
        cum += p.est_s
        lines.append(f"  {i:>2}  {p.name:<20} {p.est_s:>6.0f} {cum:>6.0f} {part_cap_s(p):>6.0f}  "
                     f"{', '.join(p.targets) or '-'}")
    lines.append(f"  planned: {cum:.0f} s of {budget_s:.0f} s")
    if dropped:
        lines.append("  dropped (over budget, lowest value first): "
                     + ", ".join(f"{p.name} ({p.est_s:.0f} s)" for p in dropped))
    missing = [t for t in TARGETS if all(t not in p.targets for p in kept)]
    lines.append("  targets not covered: " + (", ".join(missing) if missing else "none"))
    return "\n".join(lines)


# ============================================================================= environment
def _ensure_package() -> str:
    """Make ``fastnoise.kernels`` importable from a bare checkout (the device machine has no
    editable install): the top-level ``kernels/`` folder is that package (setup.py). Returns
    where the kernels come from (another checkout's install would show here)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    try:
        import fastnoise.kernels as kernels
    except ImportError:
        import importlib.util

        import fastnoise

        init = os.path.join(REPO, "kernels", "__init__.py")
        spec = importlib.util.spec_from_file_location("fastnoise.kernels", init,
                                                      submodule_search_locations=[os.path.dirname(init)])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["fastnoise.kernels"] = kernels
        spec.loader.exec_module(kernels)
        fastnoise.kernels = kernels
    here = os.path.realpath(os.path.dirname(kernels.__file__))
    if here != os.path.realpath(os.path.join(REPO, "kernels")):
        print(f"warning: fastnoise.kernels comes from {here}, not this checkout", flush=True)
        return here
    return "checkout"


def _run(cmd) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def environment(device: str) -> dict:
    import torch

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": "cpu", "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
           "commit": _run(["git", "rev-parse", "--short", "HEAD"]),
           "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(), sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability())),
                   l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                   cudnn=torch.backends.cudnn.version(),
                   allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                   clocks=_run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.draw,"
                                "temperature.gpu", "--format=csv,noheader"]))
    from fastnoise import _backends_conv, _backends_linear

    env["dispatch"] = {"FUSED_MAX_M": _backends_linear.FUSED_MAX_M,
                       "FUSED_MAX_OUTPUT_PIXELS": _backends_conv.FUSED_MAX_OUTPUT_PIXELS,
                       "FUSED_MIN_WEIGHT_NUMEL": _backends_conv.FUSED_MIN_WEIGHT_NUMEL}
    return env


# ============================================================================= running
def _alarm(_signum, _frame):
    raise PartTimeout("over its time cap or the budget")


def _term(_signum, _frame):
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def stop_signals():
    """SIGALRM stops the running part (:class:`PartTimeout`); SIGTERM (``timeout``'s first
    signal) stops the run, and the summary is still written."""
    old = signal.signal(signal.SIGALRM, _alarm), signal.signal(signal.SIGTERM, _term)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old[0])
        signal.signal(signal.SIGTERM, old[1])


def _needs_ok(part: Part) -> str:
    import importlib.util

    missing = [m for m in part.needs if importlib.util.find_spec(m) is None]
    return f"missing {', '.join(missing)}" if missing else ""


def run_parts(ctx: Context, parts, budget_s: float | None, log=print) -> list[dict]:
    """Run ``parts`` in order; with a budget, drop those that no longer fit and stop any past
    its cap. Returns one status record per part."""
    import torch

    status = []
    stop_all = False
    for p in parts:
        left = None if budget_s is None else budget_s - (time.perf_counter() - ctx.t0)
        rec = {"kind": "part", "name": p.name, "est_s": p.est_s}
        why = _needs_ok(p)
        if stop_all or (left is not None and p.est_s > left):
            rec.update(status="dropped", seconds=0.0,
                       error="interrupted" if stop_all else f"{left:.0f} s left < est {p.est_s:.0f} s")
            if not stop_all:
                stop_all = True  # keep the prefix rule: nothing of lower value runs instead
        elif why:
            rec.update(status="skipped", seconds=0.0, error=why)
        else:
            log(f"[{p.name}] est {p.est_s:.0f} s" + ("" if left is None else f", {left:.0f} s left"))
            ctx.part = p.name
            torch.manual_seed(0)
            use_tuning(p.tuning)
            cap = None if left is None else min(part_cap_s(p), left)
            if cap is not None:
                signal.setitimer(signal.ITIMER_REAL, max(cap, 1.0))
            t0 = time.perf_counter()
            try:
                p.fn(ctx)
                rec["status"] = "ok"
            except PartTimeout:
                rec.update(status="timeout", error=f"stopped after {time.perf_counter() - t0:.0f} s")
            except KeyboardInterrupt:
                rec.update(status="interrupted", error="interrupted")
                stop_all = True
            except Exception as e:  # report, go on with the next part
                traceback.print_exc()
                rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:300])
            finally:
                if cap is not None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            ctx.part = None
            with contextlib.suppress(Exception):
                ctx.free()
            log(f"[{p.name}] {rec['status']} in {rec['seconds']:.1f} s" +
                (f": {rec['error']}" if rec.get("error") else ""))
        ctx.write(rec)
        status.append(rec)
    return status


def summary_table(ctx: Context, status: list[dict], env: dict) -> str:
    ran = {s["name"]: s for s in status}
    lines = ["target                    figure      goal                          result  note"]
    for p in PARTS:
        if p.name not in ran:
            continue
        for tid in p.targets:
            rec = ctx.targets.get(tid)
            if rec is None:
                lines.append(f"{tid:<25} {'-':<11} {TARGETS[tid].goal:<29} {'not run':<7} "
                             f"{p.name}: {ran[p.name]['status']}")
            else:
                lines.append(f"{tid:<25} {_fmt(rec['value']):<11} {TARGETS[tid].goal:<29} "
                             f"{_verdict(rec['ok']):<7} {rec['note'][:90]}")
    lines.append("")
    lines.append("part                 status      est_s  took_s  note")
    for s in status:
        lines.append(f"{s['name']:<20} {s['status']:<11} {s['est_s']:>5.0f} {s['seconds']:>7.1f}  "
                     f"{(s.get('error') or '')[:80]}")
    lines.append(f"\n{env.get('device')}, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch "
                 f"{env.get('torch')}, Triton {env.get('triton')}, {env.get('date_utc')}, commit "
                 f"{env.get('commit')}{' (dirty)' if env.get('dirty') else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=MAX_BUDGET_S,
                    help=f"seconds the run may take, start-up included (at most {MAX_BUDGET_S})")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-out", help="results folder ($OUT)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--smoke", action="store_true",
                    help="every part on tiny shapes, no budget (CPU: Triton interpreter); targets not judged")
    ap.add_argument("--only", default="", help="comma-separated parts to run (value order kept)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out")
    args = ap.parse_args(argv)
    if not (0 < args.budget <= MAX_BUDGET_S):
        ap.error(f"--budget must be in (0, {MAX_BUDGET_S}] seconds, got {args.budget:g}: a task has 15 "
                 f"minutes of device time, the machine's start and a rerun included")
    try:
        parts = select(PARTS, [s for s in args.only.split(",") if s], [s for s in args.skip.split(",") if s])
    except ValueError as e:
        ap.error(str(e))
    kept, dropped = plan(args.budget, parts)
    if args.dry_run:
        print(plan_text(args.budget, kept, dropped))
        return 0
    if args.smoke:
        kept, dropped = parts, []

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            ap.error("no CUDA device: only --dry-run and --smoke run on the CPU")
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    kernels_from = _ensure_package()
    os.makedirs(args.out, exist_ok=True)
    import fastnoise

    fastnoise.manual_seed(0)
    env = environment(device)
    env["kernels_from"] = kernels_from
    env["autotune"] = short_autotune() if device == "cuda" else {"interpreter": "one config per kernel"}
    env["argv"] = sys.argv[1:] if argv is None else list(argv)
    with open(os.path.join(args.out, "environment.json"), "w") as f:
        json.dump(env, f, indent=1, default=str)
    with open(os.path.join(args.out, "plan.json"), "w") as f:
        json.dump({"budget_s": args.budget, "smoke": args.smoke, "startup_s": STARTUP_S,
                   "kept": [dataclasses.asdict(p) | {"fn": p.fn.__name__} for p in kept],
                   "dropped": [p.name for p in dropped]}, f, indent=1, default=str)
    print(json.dumps(env, default=str), flush=True)
    print(plan_text(args.budget, kept, dropped) if not args.smoke else "smoke: every part, tiny shapes",
          flush=True)

    ctx = Context(args.out, args.smoke, device, log=lambda s: print(s, flush=True), t0=T_START)
    threads = torch.get_num_threads()
    try:
        if device == "cpu":
            torch.set_num_threads(1)  # tiny ops: threads would only spin against each other
        with stop_signals():
            status = run_parts(ctx, kept, None if args.smoke else args.budget - 5)
    finally:
        torch.set_num_threads(threads)
    status += [{"kind": "part", "name": p.name, "est_s": p.est_s, "status": "dropped", "seconds": 0.0,
                "error": "over budget in the plan"} for p in dropped]
    table = summary_table(ctx, status, env)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"environment": env, "parts": status, "targets": ctx.targets,
                   "autotune_picked": autotune_choices(), "seconds": time.perf_counter() - ctx.t0},
                  f, indent=1, default=str)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(table + "\n")
    ctx.close()
    print("\n" + table, flush=True)
    failed = [s for s in status if s["status"] in ("failed", "timeout", "interrupted")]
    missed = [t for t in ctx.targets.values() if t["ok"] is False]
    print(f"\n{len(ctx.rows)} figures, {len(ctx.targets)} targets ({len(missed)} missed), "
          f"{len(failed)} parts failed or stopped, {time.perf_counter() - ctx.t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
