"""A Llama-style decoder train step on the CPU (one thread): fastnoise against the naive noisy
layer (``W + sigma * randn_like(W)`` in every call), aihwkit-lightning's torch path
(``convert_to_analog`` with the equivalent ``TorchInferenceRPUConfig``: ``AddNormal`` weight noise
of the same std, no tile stages; skipped where it is not installed) and the clean model, in one
session: time (median) and live peak memory of one step, with ratios in ``extra_info``.

The issue's targets: time at most naive's, peak memory at most clean + 10%. The default size is
4 decoder layers x 512 wide, sequence 256, batch 1, vocabulary 2048 (``FASTNOISE_BENCH_LM=small``:
2 x 256, sequence 128, for a busy machine).

    python -m pytest bench/test_bench_lm.py --benchmark-columns=median,iqr,rounds
"""

import contextlib
import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from _baselines import Medians, naive_classes
from test_bench_cpu import _live_peak_bytes

import fastnoise

pytestmark = pytest.mark.cpu
pytest.importorskip("pytest_benchmark")
transformers = pytest.importorskip("transformers")

ETA = 0.05
SPEC = fastnoise.NoiseSpec(ETA, "absmax")
PROVIDERS = ["clean", "naive", "aihwkit", "fastnoise"]
BASES = ("clean", "naive", "aihwkit")
MEDIANS = Medians()
PEAKS: dict = {}
SMALL = os.environ.get("FASTNOISE_BENCH_LM") == "small"
LAYERS, WIDTH, SEQ, VOCAB = (2, 256, 128, 1024) if SMALL else (4, 512, 256, 2048)
NaiveLinear, _ = naive_classes(lambda w: ETA * w.detach().abs().max())  # SPEC's sigma


def _llama():
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=WIDTH * 8 // 3,
                                   num_hidden_layers=LAYERS, num_attention_heads=WIDTH // 64,
                                   num_key_value_heads=WIDTH // 64, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _aihwkit_config():
    """aihwkit-lightning's config of SPEC's noise (its torch path: AIHWKIT_TESTING), checked to be
    the same chip through fastnoise.from_aihwkit_lightning: weight noise only, no tile stages."""
    os.environ.setdefault("AIHWKIT_TESTING", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        pytest.importorskip("aihwkit_lightning.nn")
        from aihwkit_lightning.nn.conversion import convert_to_analog
        from aihwkit_lightning.simulator.configs import TorchInferenceRPUConfig, WeightNoiseInjectionType
    c = TorchInferenceRPUConfig()
    c.modifier.noise_type, c.modifier.std_dev = WeightNoiseInjectionType.ADD_NORMAL, ETA
    # no tile stage: one tile, no DAC / ADC / output noise / clipping / input range
    assert fastnoise.from_aihwkit_lightning(c) == (SPEC, fastnoise.TileSpec(input_range=False))
    return convert_to_analog, c


def _as(provider, model):
    model = copy.deepcopy(model)
    if provider == "aihwkit":
        convert_to_analog, cfg = _aihwkit_config()
        with contextlib.redirect_stdout(io.StringIO()):
            return convert_to_analog(model, cfg).train()
    if provider == "naive":
        for m in model.modules():
            if type(m) is torch.nn.Linear:
                m.__class__ = NaiveLinear
    elif provider == "fastnoise":
        fastnoise.convert(model, SPEC)
    return model.train()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_llama_decoder_train_step(benchmark, provider):
    model = _as(provider, _llama())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))

    def step():
        opt.zero_grad(set_to_none=False)  # the .grad buffers stay: the step frees nothing older
        logits = model(ids, use_cache=False).logits
        F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
        opt.step()

    step()
    peak = _live_peak_bytes(step)
    benchmark.group = f"Llama {LAYERS} x {WIDTH}, sequence {SEQ}, train step"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info["peak_bytes"] = peak
    PEAKS[provider] = peak
    for base in BASES:
        if base in PEAKS and base != provider:
            benchmark.extra_info[f"peak_ratio_vs_{base}"] = round(peak / PEAKS[base], 3)
    MEDIANS.record(benchmark, ("llama", "train"), provider, bases=BASES)
