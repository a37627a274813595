"""``fastnoise.from_aihwkit_lightning(rpu_config)``: an aihwkit-lightning config as fastnoise specs.

aihwkit-lightning is not imported: the config is read field by field (``docs/tile.md`` has the
table), so this works with any version whose fields keep their names. A field that is in use
(not at its default) and that fastnoise does not implement is an error naming it, never dropped.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from .spec import NoiseSpec
from .tile import TileSpec

__all__ = ["from_aihwkit_lightning", "AihwkitSpecs"]


class AihwkitSpecs(NamedTuple):
    """What :func:`fastnoise.convert` takes: ``convert(model, specs.spec, tile=specs.tile)``."""

    spec: NoiseSpec
    tile: TileSpec


# the fields read, per section; any other field must be at its default
_KNOWN = {
    "forward": {"inp_res", "out_res", "out_bound", "out_noise", "out_noise_per_channel"},
    "clip": {"type", "sigma"},
    "modifier": {"std_dev", "res", "enable_during_test", "type", "noise_type", "quantization_type"},
    "mapping": {"max_input_size"},
    "pre_post": {"input_range"},
    "pre_post.input_range": {"fast_mode", "act_range_momentum", "enable", "dynamic", "learn_input_range",
                             "init_value", "init_from_data", "init_std_alpha", "decay",
                             "input_min_percentage"},
}


def _enum(v) -> str:
    """An enum member's value (``"AddNormalPerChannel"``), or the string itself."""
    return str(getattr(v, "value", v))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _check_unknown(section: str, obj) -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        if f.name in _KNOWN.get(section, set()):
            continue
        v = getattr(obj, f.name)
        if v != _default(f):
            raise ValueError(f"aihwkit-lightning field {section}.{f.name}={v!r} is not implemented by "
                             "fastnoise (set it to its default, or leave it out)")


def _res(name: str, v) -> Optional[float]:
    """aihwkit's resolution -> steps: <= 0 none, > 1 steps, in (0, 1] the step's fraction 1/steps."""
    v = float(v)
    if v <= 0:
        return None
    steps = v if v > 1.0 else 1.0 / v
    if steps < 2:
        raise ValueError(f"aihwkit-lightning {name}={v!r} gives {steps:g} steps; "
                         "fastnoise needs >= 2 (2 bits)")
    return steps


def from_aihwkit_lightning(rpu_config) -> AihwkitSpecs:
    """The :class:`~fastnoise.NoiseSpec` and :class:`~fastnoise.TileSpec` of an aihwkit-lightning
    ``TorchInferenceRPUConfig``: ``spec, tile = from_aihwkit_lightning(cfg)`` then
    ``fastnoise.convert(model, spec, tile=tile)``.

    Mapped: ``modifier.noise_type`` / ``std_dev`` (the weight noise: ``absmax`` or
    ``absmax_per_channel``), ``clip`` (``LayerGaussian`` / ``LayerGaussianPerChannel``, which also
    makes the ADC bound per channel), ``forward.inp_res`` / ``out_res`` / ``out_bound`` /
    ``out_noise`` / ``out_noise_per_channel``, ``mapping.max_input_size`` and
    ``pre_post.input_range`` (static or learned, with its initialisation from data and decay).
    Errors (``ValueError`` naming the field): weight quantization (``modifier.quantization_type``),
    learnable weight clipping, dynamic or fast-mode input ranges, and any other field away from
    its default.
    """
    for section in ("forward", "clip", "modifier", "mapping", "pre_post"):
        if not hasattr(rpu_config, section):
            raise TypeError(f"expected an aihwkit-lightning TorchInferenceRPUConfig, got "
                            f"{type(rpu_config).__name__} (no field {section!r})")
        _check_unknown(section, getattr(rpu_config, section))
    if dataclasses.is_dataclass(rpu_config):
        extra = [f.name for f in dataclasses.fields(rpu_config)
                 if f.name not in ("forward", "clip", "modifier", "mapping", "pre_post")
                 and getattr(rpu_config, f.name) != _default(f)]
        if extra:
            raise ValueError(f"aihwkit-lightning field {extra[0]}={getattr(rpu_config, extra[0])!r} is not "
                             "implemented by fastnoise")
    fwd, clip, mod = rpu_config.forward, rpu_config.clip, rpu_config.modifier
    ir = rpu_config.pre_post.input_range
    _check_unknown("pre_post.input_range", ir)

    # weight noise (the deprecated modifier.type first, as aihwkit-lightning maps it)
    old = _enum(mod.type)
    noise_type, quant = _enum(mod.noise_type), _enum(mod.quantization_type)
    if old != "None":
        if "Discretize" in old:
            raise ValueError(f"aihwkit-lightning field modifier.type={old!r} (weight quantization) is not "
                             "implemented by fastnoise")
        noise_type = "AddNormalPerChannel" if old.endswith("PerChannel") else "AddNormal"
    if quant != "None":
        raise ValueError(f"aihwkit-lightning field modifier.quantization_type={quant!r} (weight "
                         "quantization) is not implemented by fastnoise")
    if noise_type == "None":
        spec = NoiseSpec(eta=0.0, scale="absmax")
    elif noise_type == "AddNormal":
        spec = NoiseSpec(eta=float(mod.std_dev), scale="absmax")
    elif noise_type == "AddNormalPerChannel":
        spec = NoiseSpec(eta=float(mod.std_dev), scale="absmax_per_channel")
    else:
        raise ValueError(f"aihwkit-lightning field modifier.noise_type={noise_type!r} is not implemented")

    ctype = _enum(clip.type)
    kw: dict = {}
    if ctype == "LayerGaussian":
        kw.update(clip="sigma", clip_sigma=float(clip.sigma))
    elif ctype == "LayerGaussianPerChannel":
        kw.update(clip="sigma_per_channel", clip_sigma=float(clip.sigma), bound_per_channel=True)
    elif ctype != "None":
        raise ValueError(f"aihwkit-lightning field clip.type={ctype!r} is not implemented by fastnoise")
    if ctype != "None" and not float(clip.sigma) > 0:
        raise ValueError(f"aihwkit-lightning field clip.sigma={clip.sigma!r} must be > 0 "
                         f"with clip.type={ctype!r}")

    if ir.enable:
        if ir.dynamic:
            raise ValueError("aihwkit-lightning field pre_post.input_range.dynamic=True (a range per input "
                             "vector) is not implemented by fastnoise")
        if ir.fast_mode:
            raise ValueError("aihwkit-lightning field pre_post.input_range.fast_mode=True is not implemented "
                             "by fastnoise (it uses the straight-through rule of the default mode)")
    if not ir.enable:
        for name, on in (("inp_res", float(fwd.inp_res) > 0), ("out_bound", float(fwd.out_bound) > 0),
                         ("out_noise", float(fwd.out_noise) > 0)):
            if on:
                raise ValueError(f"aihwkit-lightning field forward.{name}={getattr(fwd, name)!r} needs "
                                 "pre_post.input_range.enable=True (it is relative to the input range)")
    out_res = _res("forward.out_res", fwd.out_res)
    out_bound = float(fwd.out_bound) if float(fwd.out_bound) > 0 else None
    if out_res is not None and out_bound is None:
        raise ValueError(f"aihwkit-lightning field forward.out_res={fwd.out_res!r} "
                         "needs forward.out_bound > 0")
    m = int(rpu_config.mapping.max_input_size)
    tile = TileSpec(
        max_input_size=m if m > 0 else None,
        inp_res=_res("forward.inp_res", fwd.inp_res),
        out_res=out_res,
        out_bound=out_bound,
        out_noise=float(fwd.out_noise),
        out_noise_per_channel=bool(fwd.out_noise_per_channel),
        input_range=bool(ir.enable),
        learn_input_range=bool(ir.learn_input_range),
        input_range_init=float(ir.init_value),
        init_from_data=int(ir.init_from_data),
        init_std_alpha=float(ir.init_std_alpha),
        decay=float(ir.decay),
        input_min_percentage=float(ir.input_min_percentage),
        **kw,
    )
    return AihwkitSpecs(spec, tile)
