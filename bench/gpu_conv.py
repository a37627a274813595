"""Conv part of the GPU check: correctness at ResNet-50 sizes, then the timings of issue 5's targets.

    python bench/run_gpu.py --only conv_correctness,conv_per_layer   # its helpers, through the driver
    python -c "from bench.gpu_conv import run; run('out')"             # this module's own run

:func:`run` checks the fused and generate conv paths against the in-package reference on all
53 ResNet-50 conv shapes (distinct shapes once) at batch 1 and 32 in bf16, fp16 and fp32,
forward and every gradient; then times, in one run on one GPU:

- per layer, batch 1 and 8, bf16 channels_last: clean cuDNN, naive ``w + s*randn_like(w)``,
  fastnoise auto / fused / generate; GPU time from CUDA-graph replays (target: auto <= 1.5x
  clean, per layer) and eager time, which at these sizes is mostly Python and launch overhead;
- the ResNet-50 training step at batch 128, bf16 autocast, channels_last, SGD: (a) clean
  student, (b) naive KD + noise (forward pre-hooks), (c) fastnoise KD + noise, (d) fastnoise
  consistency; images/s and peak memory (targets: (c) at least as fast as (b) with less
  memory, (c) within 1.4x of (a));
- robustness evaluation at batch 1 and 8: 10 noise draws, each a pass over
  :data:`BATCHES_PER_DRAW` batches: naive hooks (and, for scale, weights perturbed once per draw)
  vs fastnoise with and without :func:`fastnoise.pregenerate.pregenerated` (target: fastnoise
  faster than the naive hooks).

Timings are medians of ``triton.testing.do_bench`` on random (never zero) inputs. With
``quick=True`` everything runs at tiny sizes (a tiny ResNet-like model, few steps) and also on
the CPU under ``TRITON_INTERPRET=1``; its timings mean nothing and its targets are not evaluated.

The helpers (ResNet-50 shapes, naive noise hooks, the four training steps, the robustness
pass) are shared with the pytest-benchmark suites ``bench/test_bench_conv.py`` and
``bench/test_bench_resnet50.py``.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import time
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

import fastnoise
from fastnoise import NoiseSpec, reference
from fastnoise.functional import noisy_conv2d
from fastnoise.testing import ATOL

ETA = 0.06
SPEC = NoiseSpec(ETA, "range")
SEED = 0x5EED
DRAWS = 10
BATCHES_PER_DRAW = 8
CONSISTENCY_LAYERS = ("layer1", "layer2", "layer3", "layer4")

# ----------------------------------------------------------------------------- ResNet-50 shapes
ConvShape = namedtuple("ConvShape", "cin cout k stride hw")
ConvShape.__str__ = lambda s: f"{s.cin}x{s.hw}x{s.hw}-k{s.k}s{s.stride}-{s.cout}"


def resnet50_conv_shapes(image: int = 224) -> list:
    """The 53 convs of torchvision's ResNet-50 in forward order (input side ``hw``; padding k//2).

    Bottleneck v1.5: the stride sits on the 3x3; the downsample 1x1 runs after conv3.
    """
    hw = (image + 2 * 3 - 7) // 2 + 1
    shapes = [ConvShape(3, 64, 7, 2, image)]
    hw = (hw + 2 - 3) // 2 + 1  # max pool 3x3 s2 p1
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for j in range(blocks):
            s = stride if j == 0 else 1
            out_hw = (hw + 2 - 3) // s + 1
            shapes += [ConvShape(inplanes, planes, 1, 1, hw), ConvShape(planes, planes, 3, s, hw),
                       ConvShape(planes, planes * 4, 1, 1, out_hw)]
            if j == 0:
                shapes.append(ConvShape(inplanes, planes * 4, 1, s, hw))
            inplanes, hw = planes * 4, out_hw
    return shapes


def distinct_shapes(shapes) -> list:
    """Each shape once, in first-seen order."""
    return list(dict.fromkeys(shapes))


def count_of(shapes) -> dict:
    out: dict = {}
    for s in shapes:
        out[s] = out.get(s, 0) + 1
    return out


def _quick_shapes() -> list:
    return [ConvShape(5, 7, 3, 1, 9), ConvShape(6, 9, 1, 2, 9)]


# ----------------------------------------------------------------------------- timing
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, quick: bool = False, calls: int = 10) -> float:
    """Median time of ``fn()`` in ms, after one untimed call (compilation, autotuning).

    On a GPU, short callables (< 5 ms) go through ``triton.testing.do_bench`` (median); longer
    ones (training steps, evaluation passes) are timed call by call, synchronized, ``calls``
    times. On the CPU (quick runs) a wall clock, once.
    """
    fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = (time.perf_counter() - t0) * 1e3
    if once < 5.0:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=20 if quick else 100,
                                             return_mode="median"))
    times = []
    for _ in range(3 if quick else calls):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_ms(fn):
    """Median GPU time of ``fn()`` in ms from CUDA-graph replays (no CPU launch overhead); None
    without CUDA or when ``fn`` cannot be captured."""
    if not torch.cuda.is_available():
        return None
    import triton.testing

    fn()
    sync()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
    except Exception:  # not capturable (host syncs, allocations the graph cannot hold)
        return None


def peak_mb(fn, repeats: int = 2):
    """Peak allocated memory (MiB) over ``repeats`` calls of ``fn``; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**20


# ----------------------------------------------------------------------------- correctness
def _err_ratio(out, torch_out, upcast, factor=2.0) -> float:
    """max|out - ref| / (factor * max|torch_out - ref| + atol * scale): <= 1 passes
    :func:`fastnoise.testing.assert_close_to_reference`."""
    if not torch.isfinite(out).all():
        return float("inf")
    ref = upcast.double()
    scale = max(1.0, ref.abs().max().item())
    err = (out.double() - ref).abs().max().item()
    base = (torch_out.double() - ref).abs().max().item()
    return err / (factor * base + ATOL[out.dtype] * scale)


def check_conv(shape: ConvShape, batch: int, dtype: torch.dtype, path: str, spec: NoiseSpec,
               dev: torch.device) -> float:
    """Worst error ratio (output, grad input, grad weight, grad bias) of ``path`` on one shape,
    bias with noise, channels_last; the reference is the package's in the same dtype and in
    float64."""
    g = torch.Generator(device="cpu").manual_seed(hash(shape) & 0xFFFF)
    x = torch.randn(batch, shape.cin, shape.hw, shape.hw, generator=g).to(dev, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    fan_in = shape.cin * shape.k ** 2
    w = (torch.randn(shape.cout, shape.cin, shape.k, shape.k, generator=g) / fan_in ** 0.5).to(dev, dtype)
    b = (torch.randn(shape.cout, generator=g) * 0.1).to(dev, dtype)
    stride, pad = [shape.stride] * 2, [shape.k // 2] * 2
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = noisy_conv2d(*leaves, stride, pad, 1, 1, spec, SEED, 7, path=path)
    grad = torch.randn(y.shape, generator=g).to(dev, dtype)
    y.backward(grad)
    got = [y.detach()] + [t.grad for t in leaves]
    sigma = spec.sigma(w, b)
    off = torch.tensor(7, device=dev)
    geo = (stride, pad, [1, 1], 1)

    def ref(xx, ww, bb, gg):
        yy = reference.conv2d_forward(xx, ww, bb, sigma, spec.mode, spec.noise_bias, SEED, off, *geo)
        grads = reference.conv2d_backward(gg, xx, ww, sigma, spec.mode, SEED, off, *geo, True, True, True)
        return [yy, *grads]

    same = ref(x, w, b, grad)
    up = ref(x.double(), w.double(), b.double(), grad.double())
    return max(_err_ratio(a.to(s.dtype), s, u) for a, s, u in zip(got, same, up, strict=True))


def correctness(quick: bool, dev: torch.device) -> tuple[list, list]:
    shapes = _quick_shapes() if quick else distinct_shapes(resnet50_conv_shapes())
    batches = (1,) if quick else (1, 32)
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    spec = NoiseSpec(0.1, "absmax_per_channel", noise_bias=True)
    rows, detail = [], []
    for batch in batches:
        for dtype in dtypes:
            for path in ("fused", "generate"):
                ratios = {str(s): check_conv(s, batch, dtype, path, spec, dev) for s in shapes}
                worst = max(ratios, key=ratios.get)
                detail.append({"batch": batch, "dtype": str(dtype), "path": path, "ratios": ratios})
                rows.append({"case": f"rn50 convs b{batch} {str(dtype)[6:]} {path} (worst {worst})",
                             "metric": "max_err_ratio", "value": ratios[worst], "target": "<= 1",
                             "ok": ratios[worst] <= 1.0})
    return rows, detail


# ----------------------------------------------------------------------------- per-layer timing
def conv_output_hw(shape: ConvShape) -> int:
    return (shape.hw + 2 * (shape.k // 2) - shape.k) // shape.stride + 1


def layer_fn(shape: ConvShape, batch: int, provider: str, dev: torch.device, dtype=torch.bfloat16):
    """A callable running one conv of ``shape`` at ``batch`` (bf16, channels_last) by ``provider``:
    ``clean`` (cuDNN), ``naive`` (``w + s * randn_like(w)`` then cuDNN, s from the range of w),
    or fastnoise ``auto`` / ``fused`` / ``generate``."""
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, shape.cin, shape.hw, shape.hw, generator=g).to(dev, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(shape.cout, shape.cin, shape.k, shape.k, generator=g) * 0.05).to(dev, dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    stride, pad = shape.stride, shape.k // 2
    if provider == "clean":
        return lambda: F.conv2d(x, w, None, stride, pad)
    if provider == "naive":
        def naive():
            sigma = ETA * (w.max() - w.min())
            return F.conv2d(x, w + sigma * torch.randn_like(w), None, stride, pad)
        return naive
    offset = torch.zeros((), dtype=torch.int64, device=dev)
    return lambda: noisy_conv2d(x, w, None, stride, pad, 1, 1, SPEC, SEED, offset, path=provider)


def per_layer(quick: bool, dev: torch.device) -> tuple[list, list]:
    """Per-layer times, eager (``do_bench``: GPU time plus the CPU's launch overhead when that is
    longer) and GPU-only (CUDA graphs); the 1.5x target is judged on GPU time when there is one."""
    all_shapes = _quick_shapes()[:1] if quick else resnet50_conv_shapes()
    counts = count_of(all_shapes)
    providers = ("clean", "naive", "auto", "fused", "generate")
    rows, detail = [], []
    crossover = {"fused_faster_max_m": 0, "generate_faster_min_m": None}
    for batch in ((1,) if quick else (1, 8)):
        eager = dict.fromkeys(providers, 0.0)
        graph = dict.fromkeys(providers, 0.0)
        worst = (0.0, None)
        for shape in counts:
            fns = {p: layer_fn(shape, batch, p, dev) for p in providers}
            t = {p: median_ms(fns[p], quick) for p in providers}
            g = {p: gpu_ms(fns[p]) for p in providers}
            for p in providers:
                eager[p] += counts[shape] * t[p]
                graph[p] = None if graph[p] is None or g[p] is None else graph[p] + counts[shape] * g[p]
            basis = g if g["auto"] is not None and g["clean"] is not None else t
            ratio = basis["auto"] / basis["clean"]
            worst = max(worst, (ratio, str(shape)), key=lambda v: v[0])
            m = batch * conv_output_hw(shape) ** 2
            faster = basis["fused"] < basis["generate"]
            if faster:
                crossover["fused_faster_max_m"] = max(crossover["fused_faster_max_m"], m)
            elif crossover["generate_faster_min_m"] is None or m < crossover["generate_faster_min_m"]:
                crossover["generate_faster_min_m"] = m
            detail.append({"shape": str(shape), "count": counts[shape], "batch": batch, "m": m,
                           "eager_ms": t, "gpu_ms": g, "auto_vs_clean": ratio})
        for p in providers:
            rows.append({"case": f"rn50 convs b{batch} sum {p} (eager)", "metric": "ms", "value": eager[p],
                         "target": None, "ok": True})
            if graph[p] is not None:
                rows.append({"case": f"rn50 convs b{batch} sum {p} (GPU, graphs)", "metric": "ms",
                             "value": graph[p], "target": None, "ok": True})
        kind = "GPU" if graph["auto"] is not None and graph["clean"] is not None else "eager"
        rows.append({"case": f"rn50 convs b{batch} worst layer auto/clean, {kind} ({worst[1]})",
                     "metric": "ratio", "value": worst[0], "target": "<= 1.5 (quick: not evaluated)"
                     if quick else "<= 1.5", "ok": True if quick else worst[0] <= 1.5})
    rows.append({"case": "fused faster than generate up to M", "metric": "m",
                 "value": crossover["fused_faster_max_m"], "target": "sets FUSED_MAX_OUTPUT_PIXELS",
                 "ok": True})
    detail.append({"crossover": crossover})
    return rows, detail


# ----------------------------------------------------------------------------- models and steps
class _TinyBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """A ResNet-shaped toy (stem, layer1..layer4, fc) for the quick CPU run."""

    def __init__(self, num_classes=10, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _TinyBlock(width, width, 1)
        self.layer2 = _TinyBlock(width, 2 * width, 2)
        self.layer3 = _TinyBlock(2 * width, 4 * width, 2)
        self.layer4 = _TinyBlock(4 * width, 8 * width, 2)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(quick: bool, dev: torch.device) -> nn.Module:
    if quick:
        model = TinyResNet()
    else:
        import torchvision

        model = torchvision.models.resnet50()
    return model.to(dev).to(memory_format=torch.channels_last)


class NaiveWeightNoise:
    """Weight noise as written without fastnoise: a forward pre-hook per Conv2d / Linear sets
    ``weight = weight_orig + sigma * randn_like(weight_orig)``, ``sigma = eta * (max - min)``
    (the parameter moves to ``weight_orig``, as ``torch.nn.utils.spectral_norm`` does).
    The noisy weight lives until the next forward and autograd keeps its cast for backward.
    """

    def __init__(self, model: nn.Module, eta: float = ETA):
        self.eta = eta
        self.handles = []
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                del m._parameters["weight"]
                m.register_parameter("weight_orig", w)
                m.weight = w.detach()
                self.handles.append(m.register_forward_pre_hook(self._hook))

    def _hook(self, module, args):
        w = module.weight_orig
        sigma = self.eta * (w.max() - w.min()).detach()
        module.weight = w + sigma * torch.randn_like(w)


def kd_loss(student_logits, teacher_logits, target, temperature=6.0, alpha=0.9):
    try:
        from fastnoise.train.losses import kd_loss as fn
    except ImportError:  # the formula, as the training layer defines it
        s, t = student_logits.float(), teacher_logits.float()
        ce = F.cross_entropy(s, target)
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                      reduction="batchmean", log_target=True)
        return (1 - alpha) * ce + alpha * temperature ** 2 * kl
    return fn(student_logits, teacher_logits, target, temperature=temperature, alpha=alpha)


def _batch(batch: int, quick: bool, dev: torch.device, classes: int, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    image = 8 if quick else 224
    x = torch.randn(batch, 3, image, image, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), generator=g).to(dev)
    return x, y


STEPS = ("clean", "naive_kd", "fastnoise_kd", "fastnoise_consistency")


def make_step(kind: str, batch: int, quick: bool = False, dev: torch.device | None = None):
    """A callable doing one training step of ``kind`` (see :data:`STEPS`) and synchronizing.

    bf16 autocast, channels_last, SGD (momentum 0.9); the teacher (KD) is a frozen copy of the
    student's initial weights run under ``torch.inference_mode``; the consistency step's clean
    pass runs under ``torch.no_grad`` (its features are the MSE's target, which mse_loss saves
    for backward and an inference-mode tensor cannot be) with ``fastnoise.noise(enabled=False)``.
    """
    if kind not in STEPS:
        raise ValueError(f"kind must be one of {STEPS}, got {kind!r}")
    dev = dev or device()
    fastnoise.manual_seed(SEED)
    torch.manual_seed(0)
    base = build_model(quick, dev)
    classes = base.fc.out_features
    x, y = _batch(batch, quick, dev, classes)
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    student = base.train()
    if kind == "naive_kd":
        NaiveWeightNoise(student)
    elif kind != "clean":
        fastnoise.convert(student, SPEC)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    feats: dict = {}
    if kind == "fastnoise_consistency":
        for name in CONSISTENCY_LAYERS:
            getattr(student, name).register_forward_hook(
                lambda m, a, out, name=name: feats.__setitem__(name, out))

    def step():
        with amp:
            if kind in ("naive_kd", "fastnoise_kd"):
                with torch.inference_mode():
                    t = teacher(x)
                loss = kd_loss(student(x), t.clone(), y)
            elif kind == "fastnoise_consistency":
                with torch.no_grad(), fastnoise.noise(enabled=False):
                    student(x)
                clean = [feats[n] for n in CONSISTENCY_LAYERS]
                out = student(x)
                noisy = [feats[n] for n in CONSISTENCY_LAYERS]
                cons = [F.mse_loss(a.float(), b.float()) for a, b in zip(noisy, clean, strict=True)]
                loss = F.cross_entropy(out.float(), y) + torch.stack(cons).mean()
            else:
                loss = F.cross_entropy(student(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        feats.clear()
        sync()

    return step


def steps(quick: bool, dev: torch.device) -> tuple[list, list]:
    batch = 2 if quick else 128
    res = {}
    for kind in STEPS:
        fn = make_step(kind, batch, quick, dev)
        for _ in range(0 if quick else 2):  # warm-up: autotuning, cuDNN plans, allocator
            fn()
        mem = peak_mb(fn)
        ms = median_ms(fn, quick)
        res[kind] = {"ms": ms, "images_per_s": batch / ms * 1e3, "peak_mb": mem}
        del fn
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rows = []
    for kind, r in res.items():
        rows.append({"case": f"rn50 step b{batch} {kind}", "metric": "images_per_s",
                     "value": r["images_per_s"], "target": None, "ok": True})
        if r["peak_mb"] is not None:
            rows.append({"case": f"rn50 step b{batch} {kind}", "metric": "peak_mb", "value": r["peak_mb"],
                         "target": None, "ok": True})
    fk, nk, cl = res["fastnoise_kd"], res["naive_kd"], res["clean"]
    q = " (quick: not evaluated)" if quick else ""
    rows.append({"case": "fastnoise KD step / naive KD step", "metric": "time_ratio",
                 "value": fk["ms"] / nk["ms"], "target": "<= 1" + q, "ok": quick or fk["ms"] <= nk["ms"]})
    if fk["peak_mb"] is not None:
        rows.append({"case": "fastnoise KD step / naive KD step", "metric": "peak_mem_ratio",
                     "value": fk["peak_mb"] / nk["peak_mb"], "target": "< 1" + q,
                     "ok": quick or fk["peak_mb"] < nk["peak_mb"]})
    rows.append({"case": "fastnoise KD step / clean student step", "metric": "time_ratio",
                 "value": fk["ms"] / cl["ms"], "target": "<= 1.4" + q,
                 "ok": quick or fk["ms"] <= 1.4 * cl["ms"]})
    return rows, [{"batch": batch, "steps": res}]


# ----------------------------------------------------------------------------- robustness evaluation
ROBUSTNESS = ("clean", "naive", "naive_perturb", "fastnoise", "fastnoise_pregenerated")


def make_robustness(kind: str, batch: int, quick: bool = False, dev: torch.device | None = None,
                    draws: int = DRAWS, batches_per_draw: int = BATCHES_PER_DRAW):
    """A callable evaluating ``draws`` noise draws, each a pass over ``batches_per_draw`` batches
    (eval, bf16 autocast, channels_last, inference_mode).

    ``naive``: forward pre-hooks draw ``w + s * randn_like(w)`` at every forward;
    ``naive_perturb``: the weights are perturbed in place once per draw and restored after (what
    a careful hand-written evaluation does); ``fastnoise``: ``fastnoise.noise(draw=k, eta)``;
    ``fastnoise_pregenerated``: the same inside ``pregenerated(model)``, which generates each
    draw's weights once; ``clean``: the same forwards without noise, for scale.
    """
    if kind not in ROBUSTNESS:
        raise ValueError(f"kind must be one of {ROBUSTNESS}, got {kind!r}")
    dev = dev or device()
    fastnoise.manual_seed(SEED)
    torch.manual_seed(0)
    model = build_model(quick, dev).eval()
    xs = [_batch(batch, quick, dev, model.fc.out_features, seed=i)[0] for i in range(batches_per_draw)]
    if kind == "naive":
        NaiveWeightNoise(model)
    elif kind.startswith("fastnoise"):
        fastnoise.convert(model, SPEC)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    saved = [w.detach().clone() for w in weights] if kind == "naive_perturb" else []
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    from fastnoise.pregenerate import pregenerated

    def one_pass():
        for x in xs:
            model(x)

    def run_draws():
        with torch.inference_mode(), amp:
            if kind == "fastnoise_pregenerated":
                with pregenerated(model):
                    for k in range(draws):
                        with fastnoise.noise(draw=k, eta=ETA):
                            one_pass()
            else:
                for k in range(draws):
                    if kind == "fastnoise":
                        with fastnoise.noise(draw=k, eta=ETA):
                            one_pass()
                    elif kind == "naive_perturb":
                        for w in weights:
                            w.add_(ETA * (w.max() - w.min()) * torch.randn_like(w))
                        one_pass()
                        for w, w0 in zip(weights, saved, strict=True):
                            w.copy_(w0)
                    else:
                        one_pass()
        sync()

    return run_draws


def robustness(quick: bool, dev: torch.device) -> tuple[list, list]:
    rows, detail = [], []
    draws, per_draw = (2, 2) if quick else (DRAWS, BATCHES_PER_DRAW)
    for batch in ((1,) if quick else (1, 8)):
        t = {k: median_ms(make_robustness(k, batch, quick, dev, draws, per_draw), quick, calls=5)
             for k in ROBUSTNESS}
        detail.append({"batch": batch, "draws": draws, "batches_per_draw": per_draw, "ms": t})
        for k in ROBUSTNESS:
            rows.append({"case": f"rn50 eval b{batch}, {draws} draws x {per_draw} batches, {k}",
                         "metric": "ms", "value": t[k], "target": None, "ok": True})
        best = min(t["fastnoise"], t["fastnoise_pregenerated"])
        rows.append({"case": f"rn50 eval b{batch}, {draws} draws: best fastnoise / naive hooks",
                     "metric": "time_ratio", "value": best / t["naive"],
                     "target": "< 1 (quick: not evaluated)" if quick else "< 1",
                     "ok": quick or best < t["naive"]})
    return rows, detail


# ----------------------------------------------------------------------------- driver entry
def run(out_dir: str, quick: bool = False) -> list:
    """Correctness then timings; writes ``conv.json`` into ``out_dir``; returns the rows."""
    dev = device()
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.makedirs(out_dir, exist_ok=True)
    rows, detail = [], {}
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # tiny ops: OpenMP threads would only spin against each other
        torch.set_num_threads(1)
    try:
        for name, part in (("correctness", correctness), ("per_layer", per_layer), ("steps", steps),
                           ("robustness", robustness)):
            t0 = time.perf_counter()
            part_rows, part_detail = part(quick, dev)
            rows += part_rows
            detail[name] = {"seconds": time.perf_counter() - t0, "detail": part_detail}
    finally:
        torch.set_num_threads(threads)
    env = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "quick": quick}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    with open(os.path.join(out_dir, "conv.json"), "w") as f:
        json.dump({"environment": env, "rows": rows, "detail": detail}, f, indent=1, default=str)
    return rows
