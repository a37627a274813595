"""Noisy matmul with the weight noise generated inside the kernel (the ``fused`` linear path).

Forward and the input gradient of ``y = x @ (W + sigma z)^T + b`` with ``W: [N, K]``:

    Y[M, N]  = X[M, K]  @ Wn[N, K]^T (+ bn),    Wn = round_c(W + sigma * z)
    dX[M, K] = dY[M, N] @ Wn[N, K]

``round_c`` rounds once to the compute dtype (the dtype of ``X`` / ``dY``), ``z`` is the
contract's noise of element ``(n, k)`` (:mod:`fastnoise.rng`), drawn by
:func:`~fastnoise.kernels.philox.normal_tile` from the weight tile's own indices, so every
M-tile, every split of the reduction and the backward regenerate the same ``z``. ``W`` is read
in its own dtype (float32 under autocast) and the noise is added in float32; products
accumulate in float32.

One kernel serves both products. It computes ``OUT[M, P] = A[M, R] @ B[R, P]`` with ``B``
built from a weight tile:

- forward (``TRANS_W=False``): ``P = N``, ``R = K``, ``B = Wn^T`` (tile ``[BP, BR]`` of W);
- input gradient (``TRANS_W=True``): ``P = K``, ``R = N``, ``B = Wn`` (tile ``[BR, BP]``).

Cost: every M-tile draws its own copy of the noise of the weight slice it reads, so a call
draws ``cdiv(M, BM) * N * K`` normals; the path pays off for few M-tiles (see DESIGN.md). To
keep all SMs drawing noise when there are few tiles, the reduction may be split (``SPLIT``
programs per output tile writing float32 partial sums, added on the host in a fixed order, so
results are deterministic).

float64 is not handled here: the dispatcher routes it to the reference.
"""


import torch
import triton
import triton.language as tl

from fastnoise.dispatch import triton_interpret

from .philox import noise_scale, normal_tile

__all__ = ["noisy_matmul_fwd", "noisy_matmul_dx", "split_for"]

GROUP_M = 8  # M-tiles that share a band of weight tiles (L2 reuse)
# a split's reduction range starts at a multiple of this: tile columns then start at multiples
# of 8 (normal_tile's rule), and of BR for the GPU configs (BR <= 128): no partial tiles
CHUNK_ALIGN = 128




def _configs():
    """Autotune list: small BM/BP spread the noise generation of few M-tiles over all SMs."""
    if triton_interpret():
        # one config; the interpreter's cost is per tile step, not per element: big tiles
        return [triton.Config({"BM": 64, "BP": 256, "BR": 256}, num_warps=4, num_stages=1)]
    cfg = lambda bm, bp, br, w, s: triton.Config({"BM": bm, "BP": bp, "BR": br}, num_warps=w,
                                                 num_stages=s)
    # the Philox state of a [BP, BR] noise tile is what fills the registers, so bigger tiles get
    # more warps. ptxas for sm_90 (Triton 3.8, tests/test_kernels_compile.py -s): in 16-bit every
    # forward config compiles without spills; the dX direction spills a few bytes with (16, 32, 64)
    # and (16, 64, 32); float32 without TF32 spills heavily (the dispatcher sends it to cuBLAS).
    # Kept short: each config
    # compiles once per dtype / direction / bias variant on first use.
    return [
        # few M-tiles: many small output tiles, each drawing a thin slice of the noise
        cfg(16, 32, 64, 4, 3),
        cfg(16, 64, 32, 4, 4),
        cfg(16, 64, 64, 8, 3),
        cfg(16, 64, 128, 8, 3),
        cfg(32, 64, 64, 8, 3),
        # many M-tiles (explicit path="fused" at large M): bigger tiles, fewer noise copies
        cfg(64, 64, 64, 8, 3),
        cfg(128, 128, 32, 8, 3),
    ]


def _prune(configs, named_args, **kwargs):
    """Keep BM <= M for small M (no idle rows) and BM >= 64 for large M (fewer noise copies)."""
    bucket = named_args["M_BUCKET"]
    if bucket <= 64:
        keep = [c for c in configs if c.kwargs["BM"] <= max(16, bucket)]
    else:
        keep = [c for c in configs if c.kwargs["BM"] >= 64]
    return keep or configs[:1]


@triton.jit
def _round_to(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """float32 -> ``dtype``, round to nearest even (the GPU's conversion)."""
    if EMULATE_RTNE:
        if dtype == tl.bfloat16:
            # the interpreter truncates float32 -> bfloat16; round the bits first
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "P", "R", "SPLIT", "TRANS_W"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["M", "T", "R_CHUNK", "M_BUCKET", "SPLIT"])  # one binary for all M
def _noisy_matmul_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr, sigma_ptr, offset_ptr, seed_lo, seed_hi,
    M, P, R, T, R_CHUNK, M_BUCKET, SPLIT,
    s_ab, s_at, s_ar,  # A seen as [M // T, T, R]: row m is (m // T, m % T)
    s_wn, s_wk,  # W [N, K]
    s_os, s_om, s_op,  # OUT [SPLIT, M, P] (s_os unused when SPLIT == 1)
    MODE: tl.constexpr, TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, NOISE_BIAS: tl.constexpr,
    DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr, GROUP: tl.constexpr,
):
    # grouped tile order over (m, p); axis 1 is the split of the reduction
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_m = tl.cdiv(M, BM)
    n_p = tl.cdiv(P, BP)
    per_group = GROUP * n_p
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_m
    pid_p = (pid % per_group) // group_m

    offset = tl.load(offset_ptr)  # call counter, read on the device (no host sync)
    cdtype = a_ptr.dtype.element_ty  # compute dtype

    m = pid_m * BM + tl.arange(0, BM)  # [BM]
    p = pid_p * BP + tl.arange(0, BP)  # [BP]
    m_mask = m < M
    p_mask = p < P
    m64 = m.to(tl.int64)
    a_row = (m64 // T) * s_ab + (m64 % T) * s_at  # [BM]
    p64 = p.to(tl.int64)

    acc = tl.zeros((BM, BP), dtype=tl.float32)
    r_start = pid_s * R_CHUNK
    r_end = tl.minimum(R, r_start + R_CHUNK)
    for r0 in range(r_start, r_end, BR):
        r = r0 + tl.arange(0, BR)  # [BR]
        r_mask = r < r_end
        r64 = r.to(tl.int64)
        a = tl.load(a_ptr + a_row[:, None] + r64[None, :] * s_ar,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [BM, BR]
        if TRANS_W:
            # W tile rows n = r (the reduction), columns k = p (the output)
            w_mask = r_mask[:, None] & p_mask[None, :]
            w = tl.load(w_ptr + r64[:, None] * s_wn + p64[None, :] * s_wk, mask=w_mask,
                        other=0.0).to(tl.float32)  # [BR, BP]
            z = normal_tile(seed_lo, seed_hi, offset, 0, r0, pid_p * BP, BR, BP)  # [BR, BP]
            s = noise_scale(w, sigma_ptr, r[:, None], r_mask[:, None], MODE)
            b = _round_to(w + s * z, cdtype, EMULATE_RTNE)  # [BR, BP]
        else:
            # W tile rows n = p (the output), columns k = r (the reduction)
            w_mask = p_mask[:, None] & r_mask[None, :]
            w = tl.load(w_ptr + p64[:, None] * s_wn + r64[None, :] * s_wk, mask=w_mask,
                        other=0.0).to(tl.float32)  # [BP, BR]
            z = normal_tile(seed_lo, seed_hi, offset, 0, pid_p * BP, r0, BP, BR)  # [BP, BR]
            s = noise_scale(w, sigma_ptr, p[:, None], p_mask[:, None], MODE)
            b = tl.trans(_round_to(w + s * z, cdtype, EMULATE_RTNE))  # [BR, BP]
        if DOT_UPCAST:
            # the interpreter cannot multiply bfloat16; exact: bf16 products fit in float32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    if HAS_BIAS:
        if pid_s == 0:
            bias = tl.load(bias_ptr + p, mask=p_mask, other=0.0).to(tl.float32)[None, :]  # [1, BP]
            if NOISE_BIAS:
                # the bias is row 0 of stream 1; its sigma is that of its channel p
                zb = normal_tile(seed_lo, seed_hi, offset, 1, 0, pid_p * BP, 1, BP)  # [1, BP]
                bias = bias + noise_scale(bias, sigma_ptr, p[None, :], p_mask[None, :], MODE) * zb
            acc += _round_to(bias, cdtype, EMULATE_RTNE).to(tl.float32)  # rounded as the reference

    o = out_ptr + pid_s.to(tl.int64) * s_os + m64[:, None] * s_om + p64[None, :] * s_op
    y = _round_to(acc, out_ptr.dtype.element_ty, EMULATE_RTNE)
    tl.store(o, y, mask=m_mask[:, None] & p_mask[None, :])


# ----------------------------------------------------------------------------- host side
_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_for(M: int, P: int, R: int, device: torch.device) -> int:
    """How many programs share one output tile's reduction.

    A heuristic, not a measurement: with few M-tiles (M <= 64) and fewer than two small
    (16 x 64) output tiles per SM, split the reduction until there are, keeping at least 512
    of it per split. ``bench/gpu_linear.py`` times the result; tune here if it says so.
    """
    if device.type != "cuda" or M > 64 or R < 1024:
        return 1
    tiles = triton.cdiv(M, 16) * triton.cdiv(P, 64)
    target = 2 * _sm_count(device)
    if tiles >= target:
        return 1
    return max(1, min(triton.cdiv(target, tiles), R // 512))


def _rows_view(x: torch.Tensor):
    """``x [..., R]`` as ``(tensor, T, s_b, s_t, s_r)`` with row m at ``(m // T) * s_b + (m % T) * s_t``.

    Views only; a copy is made only when the leading dims fold neither into one nor into two.
    """
    R = x.shape[-1]
    M = x.numel() // R if R else x.shape[:-1].numel()
    if x.dim() == 1:
        return x, 1, 0, 0, x.stride(0)
    try:
        v = x.view(M, R)
        return v, max(M, 1), 0, v.stride(0), v.stride(1)
    except RuntimeError:
        pass
    try:
        v = x.view(-1, x.shape[-2], R)
        return v, max(x.shape[-2], 1), v.stride(0), v.stride(1), v.stride(2)
    except RuntimeError:
        v = x.reshape(M, R)  # not expressible with two row strides: copy
        return v, max(M, 1), 0, v.stride(0), v.stride(1)


def _dot_ieee(dtype: torch.dtype) -> bool:
    """float32 follows PyTorch's TF32 switch for matmuls, so fused and cuBLAS agree."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _launch(a, w, out_shape, bias, sigma, mode, noise_bias, seed, offset, trans_w, out, split_k):
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the fused kernel computes in float16, bfloat16 or float32, got {a.dtype} "
                        "(float64 takes the reference path)")
    assert w.dim() == 2 and sigma.dtype == torch.float32 and offset.dtype == torch.int64
    R = a.shape[-1]
    P = w.shape[0] if not trans_w else w.shape[1]
    av, T, s_ab, s_at, s_ar = _rows_view(a)
    M = a.numel() // R if R else a.shape[:-1].numel()
    if out is None:
        out = torch.empty(out_shape, dtype=a.dtype, device=a.device)
    if out.shape != torch.Size(out_shape) or out.dtype != a.dtype:
        raise ValueError(f"out must be {a.dtype} of shape {tuple(out_shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if M == 0 or P == 0:
        return out
    split = split_for(M, P, R, a.device) if split_k is None else int(split_k)
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k!r}")
    chunk = triton.cdiv(triton.cdiv(max(R, 1), split), CHUNK_ALIGN) * CHUNK_ALIGN
    split = triton.cdiv(max(R, 1), chunk)
    if split == 1:
        chunk = max(R, 1)
        dst = out.view(M, P)
        s_os = 0
    else:
        dst = torch.empty(split, M, P, dtype=torch.float32, device=a.device)
        s_os = dst.stride(0)
    s_om, s_op = dst.stride(-2), dst.stride(-1)
    offset = offset.to(a.device)
    bias_arg = bias if bias is not None else sigma  # never read without HAS_BIAS
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(P, meta["BP"]), split)
    _noisy_matmul_kernel[grid](
        av, w, dst, bias_arg, sigma, offset, seed & 0xFFFFFFFF, seed >> 32,
        M, P, R, T, chunk, min(triton.next_power_of_2(M), 8192), split,
        s_ab, s_at, s_ar, w.stride(0), w.stride(1), s_os, s_om, s_op,
        MODE=mode, TRANS_W=trans_w, HAS_BIAS=bias is not None, NOISE_BIAS=bool(noise_bias),
        DOT_IEEE=_dot_ieee(a.dtype),
        DOT_UPCAST=triton_interpret() and a.dtype == torch.bfloat16,
        EMULATE_RTNE=triton_interpret() and a.dtype == torch.bfloat16,
        GROUP=GROUP_M,
    )
    if split > 1:
        out.view(M, P).copy_(dst.sum(0))  # fixed order: deterministic
    return out


def noisy_matmul_fwd(x: torch.Tensor, weight: torch.Tensor, bias, sigma: torch.Tensor, mode: int,
                     noise_bias: bool, seed: int, offset: torch.Tensor, *, out=None,
                     split_k=None) -> torch.Tensor:
    """``x @ (W + sigma z)^T + b`` (``b + sigma z_b`` with ``noise_bias``), in ``x.dtype``.

    Args:
        x: ``[..., K]`` float16 / bfloat16 / float32, any strides (the compute dtype).
        weight: ``[N, K]`` in any float dtype and strides; rounded to ``x.dtype`` after the
            noise is added.
        bias: ``[N]`` or None.
        sigma, mode: from :meth:`fastnoise.NoiseSpec.sigma` / :attr:`~fastnoise.NoiseSpec.mode`.
        seed: int in ``[0, 2**63)``; offset: int64 tensor of one element (the call counter).
        out: optional ``[..., N]`` buffer of ``x.dtype`` to write into.
        split_k: programs per output tile along K (default: :func:`split_for`).
    """
    N = weight.shape[0]
    return _launch(x, weight, (*x.shape[:-1], N), bias, sigma, mode, noise_bias, seed, offset,
                   False, out, split_k)


def noisy_matmul_dx(grad: torch.Tensor, weight: torch.Tensor, sigma: torch.Tensor, mode: int,
                    seed: int, offset: torch.Tensor, *, out=None, split_k=None) -> torch.Tensor:
    """``dY @ (W + sigma z)``: the input gradient with the forward's noise, in ``grad.dtype``.

    ``grad``: ``[..., N]``; returns ``[..., K]``. Other arguments as :func:`noisy_matmul_fwd`.
    """
    K = weight.shape[1]
    return _launch(grad, weight, (*grad.shape[:-1], K), None, sigma, mode, False, seed, offset,
                   True, out, split_k)
