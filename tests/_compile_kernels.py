"""Compile the Triton kernels of ``kernels/`` ahead of time for sm_90, without a GPU.

Run by ``tests/test_kernels_compile.py`` in a subprocess with ``TRITON_INTERPRET`` unset (under
the interpreter ``@triton.jit`` objects are interpreter functions, and the interpreter misses
what only the real compiler rejects)::

    python tests/_compile_kernels.py REPORT.json [noise_gen noisy_matmul noisy_conv pcm_chip tile_matmul]

Signatures are not written by hand: each case calls the module's real host launcher on small
CPU tensors with the kernel swapped for a recorder, and turns the recorded arguments into a
Triton signature by Triton's specialisation rules (pointer dtype from the tensor, an int equal
to 1 becomes a constexpr, a multiple of 16 gets divisibility 16, ``do_not_specialize`` ints stay
plain; checked against Triton 3.8's own specialiser on every recorded argument). Autotuned
kernels are compiled with the configs of the module's own autotune list. The jobs run through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` on one worker process per
core (``FASTNOISE_COMPILE_WORKERS``); ``FASTNOISE_COMPILE_FULL=1`` compiles the wider tier.

Registers and spills: without a driver a compiled kernel has no ``n_regs`` / ``n_spills``
(Triton reads them from the loaded function), so they come from ptxas's ``-v`` log
(``TRITON_DUMP_PTXAS_LOG``): ``n_regs``, spill-store bytes (``n_spills`` = bytes / 4) and the
stack frame; or from ``cuobjdump -res-usage`` (registers, local bytes) where that log is missing.

The report: ``{"status": "ok" | "skip", "reason", "modules": {module: {"entry_points",
"configs", "error", "results": [{"kernel", "case", "config", "ok", "error", "n_regs",
"n_spills", ...}]}}}``.
"""

import contextlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

KERNEL_MODULES = ("noise_gen", "noisy_matmul", "noisy_conv", "pcm_chip", "tile_matmul")
HELPER_MODULES = ("philox",)  # @jit device functions only, compiled inside the kernels
ARCH = 90

# (parameter dtype, compute dtype): plain fp32 / bf16 / fp16, and fp32 parameters with a 16-bit
# compute dtype (autocast: the weight stays fp32, activations and outputs are 16-bit)
BF16 = (torch.bfloat16, torch.bfloat16)
AUTOCAST = (torch.float32, torch.bfloat16)
DTYPES = [(torch.float32, torch.float32), BF16, (torch.float16, torch.float16), AUTOCAST]
FULL_DTYPES = DTYPES + [(torch.float32, torch.float16)]
MODES = (0, 1, 2)
SEED = 0x1234_5678_9ABC_DEF1  # low word >= 2**31: seed_lo is an int64 argument
SEED_I32 = 0x0000_0003_0000_0005  # low word < 2**31: seed_lo is int32



def dtypes(full):
    return FULL_DTYPES if full else DTYPES


_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8"}
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ----------------------------------------------------------------------------- API detection
def api_problem() -> str | None:
    """Why this Triton's ahead-of-time API is not one this script understands (None: fine)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction  # noqa: F401
    except ImportError as e:
        return f"triton {triton.__version__}: {e}"
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in params:
        return (f"triton {triton.__version__}: ASTSource{tuple(params)} has no 'constexprs' "
                "argument (the pre-3.2 signature/constants API is not handled)")
    return None


def ptxas_path() -> Path | None:
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        return Path(env) if Path(env).is_file() else None
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return p if p.is_file() else None


# ----------------------------------------------------------------------------- launch recording
class _Recorder:
    """Stands in for a kernel (``kernel[grid](*args, **kwargs)``) and keeps the arguments."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def record(mod, name, launch):
    """``launch()`` with ``mod.<name>`` replaced by a recorder: the launches it made."""
    kernel = getattr(mod, name)
    rec = _Recorder(kernel)
    setattr(mod, name, rec)
    try:
        launch()
    finally:
        setattr(mod, name, kernel)
    assert rec.calls, f"{mod.__name__}.{name}: the launcher did not launch it"
    return rec.calls


def jit_of(kernel):
    """The JITFunction under autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _int_type(v: int) -> str:
    if -(2**31) <= v < 2**31:
        return "i32"
    return "u64" if v >= 2**63 else "i64"


def spec(value, param):
    """(signature type, constexpr value or None, divisible by 16) of one runtime argument."""
    if isinstance(value, torch.Tensor):
        # device tensors come from the caching allocator: aligned to far more than 16 bytes
        return "*" + _NAMES[value.dtype], None, True
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if getattr(param, "do_not_specialize", False):
            return _int_type(value), None, False
        if value == 1:
            return "constexpr", 1, False
        return _int_type(value), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"unexpected kernel argument {value!r} for {getattr(param, 'name', param)}")


def make_jobs(mod, kernel_name, calls, label, configs="first"):
    """One compile job per recorded launch and autotune config (``configs``: 'first' or 'all')."""
    kernel = getattr(mod, kernel_name)
    fn = jit_of(kernel)
    tuned = getattr(kernel, "configs", None)
    if tuned is None:
        cfgs = [None]
    else:
        cfgs = list(tuned) if configs == "all" else list(tuned)[:1]
    jobs = []
    for args, kwargs in calls:
        kwargs = dict(kwargs)
        options = {k: kwargs.pop(k) for k in _OPTION_KEYS if k in kwargs}
        for cfg in cfgs:
            assert len(args) <= len(fn.arg_names), (kernel_name, len(args))
            bound = dict(zip(fn.arg_names, args, strict=False))  # positional, then keywords
            bound.update(kwargs)
            opts = dict(options)
            cfg_label = "default"
            if cfg is not None:
                bound.update(cfg.kwargs)
                for k in _OPTION_KEYS:
                    if getattr(cfg, k, None) is not None:
                        opts[k] = getattr(cfg, k)
                cfg_label = " ".join(f"{k}{v}" for k, v in cfg.kwargs.items()) + \
                    f" w{cfg.num_warps} s{cfg.num_stages}"
            signature, constexprs, divisible = {}, {}, []
            for i, name in enumerate(fn.arg_names):
                assert name in bound, f"{kernel_name}: no value for {name}"
                param = fn.params[i]
                if param.is_constexpr:
                    signature[name], constexprs[name] = "constexpr", bound[name]
                    continue
                ty, const, div = spec(bound[name], param)
                signature[name] = ty
                if ty == "constexpr":
                    constexprs[name] = const
                if div:
                    divisible.append(name)
            jobs.append(dict(module=mod.__name__.rsplit(".", 1)[1], kernel=kernel_name, case=label,
                             config=cfg_label, signature=signature, constexprs=constexprs,
                             divisible=divisible, options=opts))
    return jobs


# ----------------------------------------------------------------------------- cases per module
# Default tier (CPU CI, about a minute on two cores): every kernel x DTYPES x MODES with the first
# autotune config, every autotune config once (bf16, mode 0), and the launchers' other variants
# (bias flags, split-K, layouts, depthwise multiplier) once each. FULL adds float32 -> float16,
# the variants in every dtype, and every config in every dtype and mode: for a many-core machine.
def _sigma(mode, n):
    return torch.rand(n if mode == 1 else 1, dtype=torch.float32) * 0.1


def _offset():
    return torch.tensor([7], dtype=torch.int64)


class _Cases:
    """Collects compile jobs from launches of one kernel module."""

    def __init__(self, mod):
        self.mod = mod
        self.jobs = []

    def run(self, kernel, label, configs, launcher, *args, **kwargs):
        calls = record(self.mod, kernel, lambda: launcher(*args, **kwargs))
        self.jobs.extend(make_jobs(self.mod, kernel, calls, label, configs))


@contextlib.contextmanager
def _tf32(allow: bool):
    """``torch.backends.cuda.matmul.allow_tf32`` set for the launches recorded inside (the
    launchers read it), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _tag(wdt, cdt):
    return f"{_NAMES[wdt]}->{_NAMES[cdt]}"


def cases_noise_gen(full):
    from fastnoise.kernels import noise_gen as m

    c = _Cases(m)
    weight, multi = "_noisy_weight_kernel", "_noisy_weights_multi_kernel"
    for wdt, cdt in dtypes(full):
        for mode in MODES:
            w = torch.randn(96, 200, dtype=wdt)  # a linear weight [N, K]
            b = torch.randn(96, dtype=wdt)
            w4 = torch.randn(96, 64, 3, 3, dtype=wdt)
            s = _sigma(mode, 96)
            c.run(weight, f"{_tag(wdt, cdt)} mode{mode} linear weight", "first",
                  m.noisy_weight, w, s, mode, SEED, _offset(), cdt)
            # several tensors of one (source dtype, mode) go in one launch
            c.run(multi, f"{_tag(wdt, cdt)} mode{mode} weight+bias+conv weight", "first",
                  m.noisy_weights_multi, [w, b, w4], [s] * 3, [mode] * 3,
                  [SEED, SEED + 1, SEED + 2], [_offset(), 3, _offset()], cdt, streams=[0, 1, 0])
            if full or (wdt, cdt) == AUTOCAST:  # a bias: stream 1, sigma by column
                c.run(weight, f"{_tag(wdt, cdt)} mode{mode} bias", "first",
                      m.noisy_bias, b, s, mode, SEED, _offset(), cdt)
    w4 = torch.randn(96, 64, 3, 3, dtype=torch.bfloat16)
    for fmt in (torch.contiguous_format, torch.channels_last)[0 if full else 1:]:
        c.run(weight, f"bf16->bf16 mode0 conv weight {str(fmt)[6:]}", "first",
              m.noisy_weight, w4.contiguous(memory_format=fmt), _sigma(0, 96), 0, SEED, _offset(),
              torch.bfloat16)
    c.run(weight, "bf16->bf16 mode0 linear weight, int32 seed_lo", "first",
          m.noisy_weight, w4[:, :, 0, 0].contiguous(), _sigma(0, 96), 0, SEED_I32, _offset(),
          torch.bfloat16)
    return c.jobs


def cases_noisy_matmul(full):
    from fastnoise.kernels import noisy_matmul as m

    c = _Cases(m)
    kernel = "_noisy_matmul_kernel"

    def fwd(wdt, cdt, mode, bias=True, noise_bias=True, split=None, configs="first"):
        x = torch.randn(2, 12, 256, dtype=cdt)  # M = 24 rows, K = 256
        w = torch.randn(384, 256, dtype=wdt)
        b = torch.randn(384, dtype=wdt) if bias else None
        what = "bias+noise" if bias and noise_bias else "bias" if bias else "no bias"
        c.run(kernel, f"{_tag(wdt, cdt)} mode{mode} fwd {what}" + (f" split{split}" if split else ""),
              configs, m.noisy_matmul_fwd, x, w, b, _sigma(mode, 384), mode, noise_bias, SEED,
              _offset(), split_k=split)

    def dx(wdt, cdt, mode, split=None, configs="first"):
        g = torch.randn(24, 384, dtype=cdt)
        w = torch.randn(384, 256, dtype=wdt)
        c.run(kernel, f"{_tag(wdt, cdt)} mode{mode} dx" + (f" split{split}" if split else ""),
              configs, m.noisy_matmul_dx, g, w, _sigma(mode, 384), mode, SEED, _offset(),
              split_k=split)

    every = "all" if full else "first"
    with _tf32(False):  # PyTorch's default: float32 dots in IEEE
        for wdt, cdt in dtypes(full):
            for mode in MODES:
                fwd(wdt, cdt, mode, configs=every)
                if full or mode == 0 or (wdt, cdt) == BF16:
                    dx(wdt, cdt, mode, configs=every)
            if full or (wdt, cdt) == BF16:
                fwd(wdt, cdt, 0, split=2)  # float32 partial sums
                dx(wdt, cdt, 0, split=2)
                fwd(wdt, cdt, 0, bias=False)
                fwd(wdt, cdt, 0, noise_bias=False)
        fwd(*BF16, 0, configs="all")
        dx(*BF16, 0, configs="all")
    with _tf32(True):  # float32 with TF32 dots
        fwd(torch.float32, torch.float32, 0)
        dx(torch.float32, torch.float32, 0)
    return c.jobs


def cases_noisy_conv(full):
    from fastnoise.kernels import noisy_conv as m

    c = _Cases(m)

    def conv(wdt, cdt, mode, *, bias=True, noise_bias=True, split=1, groups=1, cl=False,
             depthwise=False, mult=1, configs="first"):
        if depthwise:
            x = torch.randn(2, 32, 10, 10, dtype=cdt)
            w = torch.randn(32 * mult, 1, 3, 3, dtype=wdt)
            groups, cout, kernel = 32, 32 * mult, "_noisy_dwconv_fwd_kernel"
        else:
            x = torch.randn(2, 64, 10, 10, dtype=cdt)
            w = torch.randn(96, 64 // groups, 3, 3, dtype=wdt)
            cout, kernel = 96, "_noisy_conv_fwd_kernel"
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
            w = w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(cout, dtype=wdt) if bias else None
        what = "bias+noise" if bias and noise_bias else "bias" if bias else "no bias"
        label = (f"{_tag(wdt, cdt)} mode{mode} {what}" + (f" split{split}" if split > 1 else "")
                 + (f" groups{groups}" if groups > 1 and not depthwise else "")
                 + (f" x{mult}" if mult > 1 else "") + (" channels_last" if cl else ""))
        c.run(kernel, label, configs, m.noisy_conv2d_fwd, x, w, b, _sigma(mode, cout), mode,
              noise_bias, SEED, _offset(), (1, 1), (1, 1), (1, 1), groups, split_k=split)

    every = "all" if full else "first"
    for wdt, cdt in dtypes(full):
        for mode in MODES:
            conv(wdt, cdt, mode, configs=every)
            conv(wdt, cdt, mode, depthwise=True)
        if full or (wdt, cdt) == BF16:
            conv(wdt, cdt, 0, split=3)  # a zeroed float32 buffer, atomic adds
            for depthwise in (False, True):
                conv(wdt, cdt, 0, bias=False, depthwise=depthwise)
            conv(wdt, cdt, 0, cl=True)  # channels_last: unit channel stride
        if full:
            for depthwise in (False, True):
                conv(wdt, cdt, 0, noise_bias=False, depthwise=depthwise)
            conv(wdt, cdt, 0, cl=True, depthwise=True)
            conv(wdt, cdt, 0, depthwise=True, mult=2)  # two output channels per input channel
            conv(wdt, cdt, 0, groups=2)
    conv(*BF16, 0, configs="all")
    return c.jobs


def cases_pcm_chip(full):
    from fastnoise.kernels import pcm_chip as m

    c = _Cases(m)
    device = (25.0, 1.0, 1.0, 1.0, 1.0, 250e-9, 20.0, 25.0)  # PCM()'s, as _hardware_ops passes it
    drift = []
    for w, label in ((torch.randn(96, 200), "conv-sized weight"), (torch.randn(7, 33), "odd weight")):
        args = (w, SEED, SEED_I32, 3, 2**31 + 5, 3600.0, device, (0.26348, 1.9650, -1.1731))

        def launch(args=args):  # both kernels of one call: _drift recorded inside _program's run
            drift.extend(record(m, "_drift", lambda: m.pcm_weight(*args)))

        c.run("_program", f"float32 {label}", "first", launch)
        c.jobs.extend(make_jobs(m, "_drift", drift, f"float32 {label}", "first"))
        drift.clear()
    return c.jobs


def cases_tile_matmul(full):
    from fastnoise.kernels import tile_matmul as m

    from fastnoise.tile import TileSpec

    c = _Cases(m)
    kernel = "_tile_matmul_kernel"
    # three crossbar tiles of 86, 85, 85 rows: DAC, ADC per channel, output noise
    full_tile = TileSpec(max_input_size=100, inp_bits=8, out_bits=8, out_bound=10.0,
                         bound_per_channel=True, out_noise=0.04, init_from_data=0)

    def fwd(wdt, cdt, mode, tile=full_tile, what="tile", generated=False, bias=True, configs="first"):
        x = torch.randn(2, 12, 256, dtype=cdt)  # M = 24 rows, K = 256
        w = torch.randn(384, 256, dtype=wdt)
        b = torch.randn(384, dtype=wdt) if bias else None
        r = torch.full((len(tile.sizes(256)),), 3.0)
        noisy = torch.randn(384, 256, dtype=cdt) if generated else None
        label = (f"{_tag(wdt, cdt)} mode{mode} {what}" + (" noise generated" if generated else "")
                 + ("" if bias else " no bias"))
        c.run(kernel, label, configs, m.tile_matmul_fwd, x, w, b, r, tile, _sigma(mode, 384), mode,
              bias, SEED, _offset(), noisy_weight=noisy)

    every = "all" if full else "first"
    with _tf32(False):  # PyTorch's default: float32 dots in IEEE
        for wdt, cdt in dtypes(full):
            for mode in MODES:
                fwd(wdt, cdt, mode, configs=every)
            if full or (wdt, cdt) == BF16:
                fwd(wdt, cdt, 0, generated=True)
                fwd(wdt, cdt, 0, bias=False)
                fwd(wdt, cdt, 0, full_tile.replace(bound_per_channel=False, out_res=None, out_bits=None),
                    "bound per tensor, no ADC quantization")
                fwd(wdt, cdt, 0, full_tile.replace(out_bound=None, out_res=None, out_bits=None,
                                                   out_noise=0.0), "DAC only")
                fwd(wdt, cdt, 0, TileSpec(max_input_size=100, input_range=False), "no input range")
        fwd(*BF16, 0, configs="all")
        fwd(*BF16, 0, generated=True, configs="all")
    with _tf32(True):  # float32 with TF32 dots
        fwd(torch.float32, torch.float32, 0)
    return c.jobs


CASES = {"noise_gen": cases_noise_gen, "noisy_matmul": cases_noisy_matmul,
         "noisy_conv": cases_noisy_conv, "pcm_chip": cases_pcm_chip, "tile_matmul": cases_tile_matmul}


# ----------------------------------------------------------------------------- kernel discovery
def entry_points(mod_name):
    """The module's @jit functions that no @jit function of the kernels package calls: kernels."""
    from triton.runtime.jit import JITFunction

    def jits(name):
        mod = importlib.import_module(f"fastnoise.kernels.{name}")
        out = {}
        for attr, obj in vars(mod).items():
            try:
                fn = jit_of(obj)
            except AttributeError:
                continue
            if isinstance(fn, JITFunction) and fn.fn.__module__ == mod.__name__:
                out[attr] = fn
        return out

    every = {}
    for name in KERNEL_MODULES + HELPER_MODULES:
        every.update(jits(name))
    sources = {k: inspect.getsource(fn.fn) for k, fn in every.items()}
    called = {k for k in every for src_name, src in sources.items()
              if src_name != k and re.search(rf"\b{re.escape(k)}\s*\(", src)}
    return sorted(k for k in jits(mod_name) if k not in called)


# ----------------------------------------------------------------------------- compiling
_REG = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _res_usage(cubin: bytes):
    """(registers, local bytes) from ``cuobjdump -res-usage`` (None where it is unavailable)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(local.group(1)) if local else None)


def compile_job(job):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_of(getattr(importlib.import_module(f"fastnoise.kernels.{job['module']}"), job["kernel"]))
    index = {name: i for i, name in enumerate(fn.arg_names)}
    target = GPUTarget("cuda", ARCH, 32)
    constexprs = {(index[k],): v for k, v in job["constexprs"].items()}
    attrs = {}
    try:
        from triton.compiler.compiler import make_backend

        backend = make_backend(target)
        if hasattr(backend, "parse_attr"):
            attrs = {(index[k],): backend.parse_attr("D") for k in job["divisible"]}
    except ImportError:
        pass
    res = {k: job[k] for k in ("kernel", "case", "config")}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # ptxas -v (TRITON_DUMP_PTXAS_LOG), errors' PTX
            ck = triton.compile(ASTSource(fn, job["signature"], constexprs, attrs), target=target,
                                options=job["options"])
    except Exception as e:  # noqa: BLE001 - reported, the test asserts on it
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[:4000])
        return res
    res["seconds"] = round(time.perf_counter() - start, 2)
    cubin = ck.asm.get("cubin", b"")
    res.update(ok=True, cubin_bytes=len(cubin), cubin_elf=cubin[:4] == b"\x7fELF")
    text = log.getvalue()
    at = text.find(f"Function properties for {fn.__name__}")  # the kernel's own section
    text = text[at:] if at >= 0 else text
    regs, spills, stack = _REG.search(text), _SPILL.search(text), _STACK.search(text)
    if regs:
        res.update(source="ptxas -v", n_regs=int(regs.group(1)),
                   spill_bytes=int(spills.group(1)) if spills else 0,
                   stack_bytes=int(stack.group(1)) if stack else 0)
    else:  # no ptxas log (a cached binary, or a Triton without the knob)
        n_regs, local = _res_usage(cubin)
        res.update(source="cuobjdump", n_regs=n_regs, spill_bytes=local, stack_bytes=None)
    res["n_spills"] = None if res["spill_bytes"] is None else res["spill_bytes"] // 4
    return res


def _canary():
    """A trivial kernel: if it does not compile, the API, not the project, is the problem."""

    @triton.jit
    def _copy(src, dst, n, B: tl.constexpr):
        i = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(dst + i, tl.load(src + i, mask=i < n), mask=i < n)

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with contextlib.redirect_stdout(io.StringIO()):
        ck = triton.compile(
            ASTSource(_copy, {"src": "*fp32", "dst": "*fp32", "n": "i32", "B": "constexpr"},
                      {(3,): 128}),
            target=GPUTarget("cuda", ARCH, 32), options={"num_warps": 4})
    assert ck.asm["cubin"][:4] == b"\x7fELF"


def _worker_init():
    torch.set_num_threads(1)


def _cost(job):
    """Rough compile cost, to start the slow ones first (ptxas is slow on spilling kernels)."""
    return (job["kernel"] == "_noisy_conv_fwd_kernel", "fp32" in job["signature"].get("x_ptr", ""))


def main(out_path, modules, full=False):
    """Compile the kernels of ``modules`` and write the report (see the module docstring)."""
    out = {"triton": triton.__version__, "arch": f"sm_{ARCH}", "full": full}

    def finish(**kw):
        out.update(kw)
        Path(out_path).write_text(json.dumps(out, indent=1, default=str))

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return finish(status="skip", reason="TRITON_INTERPRET=1: @jit objects are interpreter functions")
    why = api_problem()
    if why is None and ptxas_path() is None:
        why = "ptxas not found (triton/backends/nvidia/bin/ptxas, or TRITON_PTXAS_PATH)"
    if why is None:
        try:
            _canary()
        except Exception as e:  # noqa: BLE001 - any failure here means: API not understood
            why = (f"triton {triton.__version__}: a trivial kernel does not compile ahead of time "
                   f"({type(e).__name__}: {str(e)[:500]})")
    if why is not None:
        return finish(status="skip", reason=why)
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")  # ptxas -v's log on stdout, per compile
    torch.set_num_threads(1)
    torch.manual_seed(0)
    report, jobs, seen = {}, [], set()
    for name in modules:
        report[name] = {"entry_points": [], "configs": {}, "error": None, "results": []}
        try:
            kernels = entry_points(name)
            mod = importlib.import_module(f"fastnoise.kernels.{name}")
            report[name]["entry_points"] = kernels
            report[name]["configs"] = {k: len(getattr(getattr(mod, k), "configs", None) or [None])
                                       for k in kernels}
            for job in CASES[name](full):
                key = json.dumps([job["kernel"], job["signature"], job["constexprs"], job["divisible"],
                                  job["options"]], default=str, sort_keys=True)
                if key not in seen:  # e.g. a float32 split-K launch is the plain float32 one
                    seen.add(key)
                    jobs.append(job)
        except Exception as e:  # noqa: BLE001 - a launcher that fails here fails its module's test
            report[name]["error"] = f"{type(e).__name__}: {e}"
    order = sorted(range(len(jobs)), key=lambda i: _cost(jobs[i]), reverse=True)
    workers = int(os.environ.get("FASTNOISE_COMPILE_WORKERS", os.cpu_count() or 1))
    start = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch's threads
        with ctx.Pool(min(workers, len(jobs)), initializer=_worker_init) as pool:
            done = pool.map(compile_job, [jobs[i] for i in order], chunksize=1)
    else:
        done = [compile_job(jobs[i]) for i in order]
    results = [None] * len(jobs)
    for i, res in zip(order, done, strict=True):
        results[i] = res
    for job, res in zip(jobs, results, strict=True):
        report[job["module"]]["results"].append(res)
    finish(status="ok", modules=report, jobs=len(jobs), workers=workers,
           wall_seconds=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(KERNEL_MODULES),
         full=os.environ.get("FASTNOISE_COMPILE_FULL", "0") == "1")
