"""Noise reaches every weight that feeds a matmul or a convolution, measured as a user would.

For each model: a dispatch-level recorder (``fastnoise.testing.weight_consumers``) lists the
parameters whose storage reaches a matmul or convolution in a train forward of the *unconverted*
model (the oracle; it knows nothing of module types). Then, for every such weight:

1. with only that weight noisy (``convert(..., exclude=every other weight)``), two train forwards
   with the same dropout draws differ;
2. in a train forward of the converted model, no clean matmul or convolution receives the weight,
   and a fastnoise op does.

The models are the issue's list: torchvision resnet18, mobilenet_v3_small, ViT and Swin (the
``vit_b_16`` / ``swin_t`` classes with small widths and depths, for time; the full-size models get
check 2 on every weight at once), ``nn.TransformerEncoder``, ``nn.MultiheadAttention`` (packed and
kdim/vdim), ``nn.LSTM`` / ``GRU`` / ``RNN`` (and cells), ``Conv1d`` / ``Conv3d`` /
``ConvTranspose1d`` / ``ConvTranspose2d``, and Hugging Face GPT-2 / BERT / Llama tiny configs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _wrappers import MHA, RNNOutput
from torch import nn

import fastnoise
from fastnoise import NoiseSpec
from fastnoise.testing import MATMUL_ATEN, matmul_operands, weight_consumers

torchvision = pytest.importorskip("torchvision")

SPEC = NoiseSpec(eta=0.05, scale="absmax")


def _g(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def _ids(*shape, high=50):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(8))


# name -> (builder, inputs); inputs are a tuple of positional args
def _hf(kind):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "bert":
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=48, vocab_size=50, max_position_embeddings=16)
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=48, vocab_size=50,
                                   max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)


class _HFLogits(nn.Module):
    """A Hugging Face model called on token ids, returning its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def _tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=48, num_classes=10)


def _tiny_swin():
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2],
                                              num_heads=[2, 2], window_size=[2, 2], num_classes=10)


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), lambda: (_g(2, 3, 32, 32),)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
                           lambda: (_g(2, 3, 32, 32),)),
    "vit (vit_b_16's class)": (_tiny_vit, lambda: (_g(2, 3, 32, 32),)),
    "swin (swin_t's class)": (_tiny_swin, lambda: (_g(2, 3, 32, 32),)),
    "TransformerEncoder": (lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 2, enable_nested_tensor=False),
        lambda: (_g(2, 5, 16),)),
    "MultiheadAttention-packed": (lambda: MHA(16), lambda: (_g(2, 5, 16),) * 3),
    "MultiheadAttention-kdim-vdim": (lambda: MHA(16, kdim=12, vdim=10, bias=True),
                                     lambda: (_g(2, 5, 16), _g(2, 4, 12), _g(2, 4, 10))),
    "LSTM": (lambda: RNNOutput(nn.LSTM(6, 7, num_layers=2, bidirectional=True)), lambda: (_g(5, 2, 6),)),
    "LSTM-proj": (lambda: RNNOutput(nn.LSTM(6, 7, proj_size=3, batch_first=True)), lambda: (_g(2, 5, 6),)),
    "GRU": (lambda: RNNOutput(nn.GRU(6, 7, num_layers=2)), lambda: (_g(5, 2, 6),)),
    "RNN": (lambda: RNNOutput(nn.RNN(6, 7, nonlinearity="relu")), lambda: (_g(5, 2, 6),)),
    "cells": (lambda: nn.ModuleDict({"a": nn.LSTMCell(6, 7), "b": nn.GRUCell(7, 5), "c": nn.RNNCell(5, 4)}),
              lambda: (_g(3, 6),)),
    "Conv1d": (lambda: nn.Conv1d(5, 7, 3, padding=1), lambda: (_g(2, 5, 11),)),
    "Conv3d": (lambda: nn.Conv3d(3, 4, 3), lambda: (_g(2, 3, 5, 6, 7),)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(5, 7, 3, stride=2), lambda: (_g(2, 5, 9),)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), lambda: (_g(2, 4, 5, 5),)),
    "gpt2": (lambda: _HFLogits(_hf("gpt2")), lambda: (_ids(2, 7),)),
    "bert": (lambda: _HFLogits(_hf("bert")), lambda: (_ids(2, 7),)),
    "llama": (lambda: _HFLogits(_hf("llama")), lambda: (_ids(2, 7),)),
}


def _call(model, inputs):
    if isinstance(model, nn.ModuleDict):  # the cells, chained, with states that are not zero
        x = inputs[0]
        h, _ = model["a"](x, (_g(3, 7), _g(3, 7)))
        return model["c"](model["b"](h, _g(3, 5)), _g(3, 4))
    return model(*inputs)


def _build(name):
    builder, inputs = MODELS[name]
    torch.manual_seed(0)
    model = builder()
    with torch.no_grad():  # zero-initialised weights (ViT's head) have sigma 0: give them values
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.05)
    return model.train(), inputs()


def _forward(model, inputs):
    torch.manual_seed(1)  # the same dropout draws in every forward
    out = _call(model, inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _names_of(model):
    """parameter object id -> every name it has (tied weights have several)."""
    names: dict = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


class _only_noisy:
    """Inside: of a converted model's weights only ``target`` draws noise (every other noisy
    module's eta is 0, and the target's module counts only the target as noisy)."""

    def __init__(self, model, target):
        self.model, self.target = model, target

    def __enter__(self):
        self.saved = []
        mname, _, wname = self.target.rpartition(".")
        for name, h in fastnoise.noisy_layers(self.model):
            self.saved.append((h, h.spec, h.noise_weights))
            if name == mname and wname in h.noise_weights:
                h.noise_weights = (wname,)
            else:
                h.spec = NoiseSpec(eta=0.0)

    def __exit__(self, *exc):
        for h, spec, weights in self.saved:
            h.spec, h.noise_weights = spec, weights


def _convert_only(model, target_names):
    keep = set(target_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastnoise.CoverageWarning)
        return fastnoise.convert(model, SPEC, exclude=lambda n, obj: isinstance(obj, nn.Parameter)
                                 and n not in keep)


def _assert_reached_by_noisy_ops(model, inputs, names):
    uses = weight_consumers(model, _forward, model, inputs)
    for n in names:
        ops = uses.get(n, {})
        clean = sorted(op for op in ops if op in MATMUL_ATEN)
        assert not clean, f"{n} still reaches clean {clean} after convert (all its uses: {dict(ops)})"
        noisy = [op for op in ops if op.startswith("fastnoise.")]
        assert noisy, f"{n} reaches no fastnoise op (its uses: {dict(ops)})"


# the quick subset (-m "not slow") keeps the small modules; these run two forwards per weight of
# a whole network (resnet18 is the file's longest test)
SLOW_MODELS = ("resnet18", "mobilenet_v3_small", "vit (vit_b_16's class)", "swin (swin_t's class)", "gpt2",
               "bert", "llama", "LSTM")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n
                                  for n in MODELS])
def test_every_matmul_weight_draws_noise(name):
    model, inputs = _build(name)
    oracle = matmul_operands(weight_consumers(model, _forward, model, inputs))
    assert oracle, f"the oracle found no matmul weight in {name}"
    names = _names_of(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    fastnoise.convert(model, SPEC)
    # no clean matmul receives any of them, a fastnoise op does
    _assert_reached_by_noisy_ops(model, inputs, sorted(oracle))
    holders = {f"{n}.{w}" if n else w for n, h in fastnoise.noisy_layers(model) for w in h.noise_weights}
    done = set()
    for target in sorted(oracle):
        pid = id(params[target])
        if pid in done:  # a tied weight: checked once, under the name its noisy module has
            continue
        done.add(pid)
        held = [n for n in names[pid] if n in holders]
        assert held, f"{name}: {target} is held by no noisy module"
        with _only_noisy(model, held[0]):
            a, b = _forward(model, inputs), _forward(model, inputs)
        assert not torch.equal(a, b), f"{name}: with only {target} noisy, two train forwards are equal"
    report = fastnoise.coverage(model)
    first = {names[id(p)][0] for n, p in params.items() if n in oracle}
    missing = first - set(report.noisy)
    assert not missing, f"coverage() does not call {sorted(missing)} noisy:\n{report}"


def test_only_one_weight_noisy_through_exclude():
    """The same, with ``convert(..., exclude=...)`` leaving every other weight clean."""
    model, inputs = _build("TransformerEncoder")
    oracle = matmul_operands(weight_consumers(model, _forward, model, inputs))
    for target in sorted(oracle):
        m = _convert_only(copy.deepcopy(model), [target])
        assert [f"{n}.{w}" for n, h in fastnoise.noisy_layers(m) for w in h.noise_weights] == [target]
        assert not torch.equal(_forward(m, inputs), _forward(m, inputs)), target


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["vit_b_16", "swin_t"])
def test_full_size_models_every_weight_reached(builder):
    torch.manual_seed(0)
    model = getattr(torchvision.models, builder)(**({"image_size": 32} if builder == "vit_b_16" else {}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    model.train()
    x = (_g(1, 3, 32, 32),)
    oracle = matmul_operands(weight_consumers(model, _forward, model, x))
    fastnoise.convert(model, SPEC)
    _assert_reached_by_noisy_ops(model, x, sorted(oracle))
    # 12 blocks x (in_proj, out_proj, 2 mlp) + conv_proj + head; Swin-T's patch embedding,
    # 12 blocks x (qkv, proj, 2 mlp), 3 patch mergings and the head
    assert len(oracle) == (50 if builder == "vit_b_16" else 53)


# ----------------------------------------------------------------------------- what is left clean
def test_convert_warns_once_naming_clean_weights_and_unmatched_patterns():
    model = _HFLogits(_hf("gpt2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastnoise.convert(model, SPEC, exclude=["model.transformer.h.0.mlp.*", "no.such.layer"])
    ours = [w for w in caught if issubclass(w.category, fastnoise.CoverageWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    assert "model.transformer.wpe.weight" in text and "embedding lookup" in text
    assert "model.transformer.h.0.mlp.c_fc.weight [32, 128]: excluded" in text
    assert "'no.such.layer' matched no module or weight" in text
    # the tied embedding is noisy in lm_head, so it is not called clean
    assert "transformer.wte.weight" not in text
    report = fastnoise.coverage(model)
    assert "model.transformer.wte.weight" in report.noisy
    assert "embedding" in report.clean["model.transformer.wpe.weight"]
    assert report.clean["model.transformer.h.0.mlp.c_fc.weight"] == "excluded"
    assert report.unmatched == ["no.such.layer"]


def test_strict_raises_for_unreachable_weights_and_unmatched_patterns():
    scripted = torch.jit.script(nn.Linear(4, 3))
    model = nn.Sequential(nn.Linear(3, 4), scripted)
    with pytest.raises(ValueError, match="TorchScript"):
        fastnoise.convert(model, SPEC, strict=True)
    with pytest.raises(ValueError, match="matched no module"):
        fastnoise.convert(nn.Sequential(nn.Linear(3, 4)), SPEC, exclude="fc", strict=True)
    with pytest.warns(fastnoise.CoverageWarning, match="TorchScript"):
        fastnoise.convert(nn.Sequential(nn.Linear(3, 4), torch.jit.script(nn.Linear(4, 3))), SPEC)


def test_embeddings_clean_by_default_noisy_on_request():
    emb = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 3))
    ids = _ids(2, 3, high=20)
    with pytest.warns(fastnoise.CoverageWarning, match="embedding lookup"):
        m = fastnoise.convert(copy.deepcopy(emb), SPEC)
    uses = weight_consumers(m, m, ids)
    assert "fastnoise.noisy_weight" not in uses["0.weight"]
    m = fastnoise.convert(copy.deepcopy(emb), SPEC, exclude="2", embeddings=True).train()
    assert not torch.equal(m(ids), m(ids))
    assert "fastnoise.noisy_weight" in weight_consumers(m, m, ids)["0.weight"]


def test_class_tokens_and_position_embeddings_are_not_matmul_weights():
    model, (x,) = _build("vit (vit_b_16's class)")
    fastnoise.convert(model, SPEC)
    model(x)
    clean = fastnoise.coverage(model).clean
    assert clean["class_token"] == "used only by cat (not a matmul)"
    assert clean["encoder.pos_embedding"] == "used only by add (not a matmul)"


# ----------------------------------------------------------------------------- uses outside forward
class _RawWeights(nn.Module):
    """A user's module: a raw matmul weight used through a view, one masked, a Mamba-style
    ``dt_proj.weight @ x`` of a child Linear whose forward is never called."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) * 0.3)
        self.m = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.register_buffer("mask", (torch.rand(6, 6) > 0.3).float())
        self.dt_proj = nn.Linear(6, 6)

    def forward(self, x):
        h = x @ self.w.t()                      # a view of the weight, then a matmul
        h = torch.tanh(h @ (self.m * self.mask))  # a weight computed from the weight and a buffer
        return (self.dt_proj.weight @ h.t()).t()  # the child's weight, outside its forward


def test_user_raw_weights_views_masks_and_direct_child_weights():
    torch.manual_seed(0)
    model = _RawWeights().train()
    x = _g(3, 5)
    # the storage oracle sees w and dt_proj.weight; m reaches its matmul as a new tensor, m * mask
    oracle = matmul_operands(weight_consumers(model, model, x))
    assert oracle == {"w", "dt_proj.weight"}
    fastnoise.convert(model, SPEC)
    assert not torch.equal(model(x), model(x))
    _assert_reached_by_noisy_ops(model, (x,), ["w", "dt_proj.weight"])
    report = fastnoise.coverage(model)
    assert {"w", "m", "dt_proj.weight"} <= set(report.noisy), report
    for target in ("w", "m", "dt_proj.weight"):  # each one alone makes the forwards differ
        with _only_noisy(model, target):
            assert not torch.equal(model(x), model(x)), target


def test_swin_qkv_is_noisy_through_the_fused_linear():
    model, (x,) = _build("swin (swin_t's class)")
    fastnoise.convert(model, SPEC)
    qkv = model.features[1][0].attn.qkv
    model(x)
    assert int(qkv.noise_calls) == 1
    assert "fused linear" in fastnoise.coverage(model).noisy["features.1.0.attn.qkv.weight"]


def test_lazy_and_parametrized_layers():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.Unflatten(1, (1, 5)), nn.LazyConv1d(3, 2),
                          nn.Flatten(), parametrizations.weight_norm(nn.Linear(12, 4)))
    fastnoise.convert(model, SPEC)
    x = _g(2, 7)
    model.train()
    a = model(x)  # materializes the lazy layers
    assert type(model[0]) is fastnoise.Linear and isinstance(model[3], nn.Conv1d)
    assert isinstance(model[5], fastnoise.Linear)
    assert not torch.equal(a, model(x))
    uses = weight_consumers(model, model, x)
    assert "fastnoise.noisy_linear" in uses["0.weight"]
    assert "fastnoise.noisy_weight" in uses["3.weight"]
    # the parametrized weight is computed from its originals; the noise goes on what is computed
    assert fastnoise.coverage(model).noisy


# ----------------------------------------------------------------------------- fused paths kept
def test_resnet_forward_still_takes_the_fused_ops():
    from fastnoise.testing import count_ops

    model, (x,) = _build("resnet18")
    fastnoise.convert(model, SPEC)
    counts = count_ops(model, x)
    assert counts["fastnoise.noisy_conv2d"] == 20 and counts["fastnoise.noisy_linear"] == 1
    assert counts["fastnoise.noisy_weight"] == 0
