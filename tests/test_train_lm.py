"""Causal language models on the training engine (``fit(..., task="causal_lm")``), on tiny
Hugging Face configs built in code: every method resumes exactly, perplexity and next-token
accuracy are what the model's own loss says, padding is masked, token-level KD (full and top-k)
matches a per-token reference, and bad input is one clear error before anything is written."""

import copy
import csv
import math
import os

import pytest
import torch
import torch.nn.functional as F
from _lm_models import VOCAB, BigramLM, padded, tiny_gpt2, tiny_llama, token_data
from torch.utils.data import DataLoader

import fastnoise
from fastnoise import NoiseSpec, evaluate_robustness
from fastnoise.train import ConfigError, fit
from fastnoise.train.losses import teacher_top_k, token_feature_distance, token_kd_loss

pytest.importorskip("transformers")

SPEC = NoiseSpec(eta=0.05)
SETTINGS = {"optim": {"name": "adamw", "lr": 1e-2}, "eval": {"etas": [0.0, 0.05], "draws": 2},
            "log": {"progress": False, "every": 1}}
LAYERS = ["model.layers.0", "model.layers.1"]
METHODS = {"clean": "clean", "noise": "noise", "kd": {"name": "kd", "temperature": 2.0},
           "kd_top_k": {"name": "kd", "temperature": 2.0, "top_k": 8},
           "consistency": {"name": "consistency", "layers": LAYERS}}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _rows(path, drop=()):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _run(out, method, stop=None, resume=False, data=None, **kw):
    train, val = data if data is not None else (token_data(32), token_data(16, seed=2))
    teacher = tiny_llama(seed=7) if isinstance(method, dict) and method["name"] == "kd" else None
    return fit(tiny_llama(), train, val, method=method, teacher=teacher, spec=SPEC, epochs=2, batch_size=8,
               out_dir=out, stop_at_step=stop, resume=resume, messages=lambda m: None, **SETTINGS, **kw)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_resumes_exactly(tmp_path, method):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    a = _run(full, METHODS[method])
    assert a.global_step == 8 and a.robustness is not None and a.robustness.metric == "perplexity"
    row = a.history[-1]
    for key in ("train_loss", "train_ppl", "train_acc", "val_ppl", "val_acc", "val_ppl_noisy"):
        assert math.isfinite(row[key]), key
    assert "train_top1" not in row and "val_top1" not in row
    if method.startswith("kd"):
        assert row["train_kd"] > 0
    if method == "consistency":
        assert row["train_consistency"] > 0
        assert not a.model.model.layers[0]._forward_hooks  # the task's hooks came off
    stopped = _run(split, METHODS[method], stop=3)
    assert stopped.stopped and stopped.global_step == 3
    b = _run(split, METHODS[method], resume=True)
    assert b.global_step == 8
    steps = _rows(os.path.join(full, "steps.csv"))
    assert steps == _rows(os.path.join(split, "steps.csv")) and len({r["loss"] for r in steps}) == 8
    assert (_rows(os.path.join(full, "metrics.csv"), drop=("seconds",))
            == _rows(os.path.join(split, "metrics.csv"), drop=("seconds",)))
    assert _rows(os.path.join(full, "robustness.csv")) == _rows(os.path.join(split, "robustness.csv"))
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_lowers_perplexity_and_the_table_says_so(tmp_path):
    r = _run(str(tmp_path / "run"), "noise", data=(token_data(64), token_data(16, seed=2)))
    assert r.history[-1]["val_ppl"] < 0.6 * VOCAB  # the sequences are learnable: far below uniform
    table = r.robustness.table()
    assert "perplexity" in table and "tokens" in table
    rows = _rows(os.path.join(tmp_path, "run", "robustness.csv"))
    assert [float(x["eta"]) for x in rows] == [0.0, 0.05]
    assert "val_ppl" in _rows(os.path.join(tmp_path, "run", "metrics.csv"))[0]


def test_perplexity_is_exp_of_the_models_own_loss():
    model = tiny_llama()
    seqs = torch.stack(token_data(8))
    fastnoise.convert(model, SPEC)
    model.eval()  # no training noise in the reference
    with torch.no_grad():
        want = math.exp(float(model(seqs, labels=seqs).loss))
        logits = model(seqs).logits[:, :-1]
        acc = float((logits.argmax(-1) == seqs[:, 1:]).float().mean()) * 100
    r = evaluate_robustness(model, [seqs[:3], seqs[3:]], [0.0], 1, progress=False)
    assert r.metric == "perplexity" and r.samples == 8 * 11
    assert r.mean[0] == pytest.approx(want, rel=1e-5)
    assert r.extra["accuracy"][0][0] == pytest.approx(acc)


def test_padding_is_masked():
    """Right padding changes nothing: other pad ids, the same perplexity and the same training."""
    model = tiny_llama()
    fastnoise.convert(model, SPEC)
    seqs = token_data(8)
    a, b = padded(seqs, 7, pad=0), padded(seqs, 7, pad=5)
    short = [s[:7] for s in seqs]
    collate = torch.utils.data.default_collate
    ra, rb, rs = (evaluate_robustness(model, [collate(d)], [0.0, 0.05], 2, progress=False, seed=3)
                  for d in (a, b, short))
    assert ra.accuracies == rb.accuracies and ra.samples == rs.samples == 8 * 6
    for x, y in zip(ra.accuracies, rs.accuracies, strict=True):
        assert x == pytest.approx(y, rel=1e-5)
    ta, tb = (fit(tiny_llama(), d, None, method="noise", spec=SPEC, epochs=1, batch_size=4,
                  messages=lambda m: None, **SETTINGS) for d in (a, b))
    assert ta.history[0]["train_loss"] == pytest.approx(tb.history[0]["train_loss"], rel=1e-6)


def _kd_reference(s, t, mask, temperature):
    """Per position: T^2 KL(softmax(t/T) || softmax(s/T)), averaged over the masked places."""
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask[b, i]:
                p = F.softmax(t[b, i].double() / temperature, -1)
                q = F.log_softmax(s[b, i].double() / temperature, -1)
                total += float((p * (p.log() - q)).sum())
                n += 1
    return temperature ** 2 * total / n


def test_token_kd_matches_the_per_token_reference():
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 13), torch.randn(3, 7, 13) * 2
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    for temp in (1.0, 2.0, 6.0):
        want = _kd_reference(s, t, mask, temp)
        assert float(token_kd_loss(s, t, mask, temp)) == pytest.approx(want, rel=1e-5)
        lp, ix = teacher_top_k(t, 13, temp)  # all of the vocabulary: the same KL
        assert float(token_kd_loss(s, lp, mask, temp, ix)) == pytest.approx(want, rel=1e-5)
    # the masked places count for nothing
    s2 = s.clone()
    s2[1, 4:] = 100.0
    assert float(token_kd_loss(s2, t, mask, 2.0)) == pytest.approx(float(token_kd_loss(s, t, mask, 2.0)))
    # top-k: the KL over the k tokens and "any other", in float64
    lp, ix = teacher_top_k(t, 4, 2.0)
    p = F.softmax(t.double() / 2.0, -1)
    q = F.softmax(s.double() / 2.0, -1)
    pk, qk = p.gather(-1, ix), q.gather(-1, ix)
    pb = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    qb = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    kl = (pb * (pb.log() - qb.log())).sum(-1)
    want = 4.0 * float(kl[mask].mean())
    assert float(token_kd_loss(s, lp, mask, 2.0, ix)) == pytest.approx(want, rel=1e-4)
    # top-k: zero when the student is the teacher, positive otherwise, gradients flow
    assert float(token_kd_loss(t, lp, mask, 2.0, ix)) == pytest.approx(0.0, abs=1e-5)
    s.requires_grad_(True)
    loss = token_kd_loss(s, lp, mask, 2.0, ix)
    loss.backward()
    assert float(loss) > 0.1 and s.grad.abs().sum() > 0 and not s.grad[1, 4:].any()


def test_token_feature_distance():
    torch.manual_seed(0)
    n, c = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cos = 1 - F.cosine_similarity(n, c, dim=-1)
    assert float(token_feature_distance(n, c, mask)) == pytest.approx(float(cos[mask].mean()), rel=1e-6)
    mse = (n - c).pow(2).mean(-1)
    got = float(token_feature_distance(n, c, mask, "mse"))
    assert got == pytest.approx(float(mse[mask].mean()), rel=1e-6)
    assert float(token_feature_distance(c, c, None)) == pytest.approx(0.0, abs=1e-6)


def test_gpt2_and_a_plain_module(tmp_path):
    train, val = token_data(16), token_data(8, seed=2)
    r = fit(tiny_gpt2(), train, val, method="noise", spec=SPEC, epochs=1, batch_size=8,
            messages=lambda m: None, **SETTINGS)
    assert r.robustness.metric == "perplexity" and math.isfinite(r.history[0]["val_ppl"])
    torch.manual_seed(0)
    r = fit(BigramLM(), train, val, method="noise", spec=SPEC, epochs=1, batch_size=8, task="causal_lm",
            messages=lambda m: None, **SETTINGS)
    assert math.isfinite(r.history[0]["val_ppl"]) and r.robustness.metric == "perplexity"


def test_same_chips_by_seed():
    model = tiny_llama()
    fastnoise.convert(model, SPEC)
    twin = copy.deepcopy(model)
    data = [torch.stack(token_data(8))]
    a = evaluate_robustness(model, data, [0.05, 0.1], 3, progress=False, seed=4)
    b = evaluate_robustness(twin, data, [0.05, 0.1], 3, progress=False, seed=4)
    c = evaluate_robustness(twin, data, [0.05, 0.1], 3, progress=False, seed=5)
    assert a.accuracies == b.accuracies and a.accuracies != c.accuracies
    assert len(set(a.accuracies[1])) == 3  # three different chips


def test_perplexity_over_time_on_pcm_chips_is_the_reference_chips():
    """evaluate_robustness(lm, hardware=PCM(), times=, task="causal_lm"): chip k at time t is the
    model with every noisy weight replaced by PCM.effective_weight (the pure-PyTorch reference) of
    key (seed, qualified name), chip k, read b for batch b; the same seed gives the same perplexities."""
    from fastnoise.modules import _DRAW_TAG

    model = tiny_llama()
    clean = copy.deepcopy(model)
    fastnoise.convert(model, SPEC)
    data = [torch.stack(token_data(8)), torch.stack(token_data(8, seed=3))]
    times, pcm = [0.0, 86400.0, 3.15e7], fastnoise.PCM()
    r = evaluate_robustness(model, data, hardware=pcm, times=times, draws=2, seed=4, task="causal_lm",
                            progress=False)
    assert r.metric == "perplexity" and r.times == times and r.extra["hardware"] == "pcm"
    assert r.samples == 2 * 8 * 11 and len(r.extra["accuracy"][0]) == 2
    assert all(math.isfinite(p) and p > 1 for a in r.accuracies for p in a)
    again = evaluate_robustness(copy.deepcopy(model), data, hardware="pcm", times=times, draws=2, seed=4,
                                progress=False)  # the task read from the batches
    assert again.accuracies == r.accuracies
    other = evaluate_robustness(model, data, hardware=pcm, times=times, draws=2, seed=5, progress=False)
    assert other.accuracies != r.accuracies
    with torch.no_grad():
        nll0, tokens0, _ = (float(v) for v in fastnoise.lm.token_stats(
            torch.cat([clean(b).logits for b in data]), torch.cat([b[:, 1:] for b in data])))
    for i, t in enumerate(times):
        for k in range(2):
            logits = []
            for read, batch in enumerate(data):  # each forward is a fresh read of the same chip
                chip = copy.deepcopy(clean)
                with torch.no_grad():
                    for name, layer in chip.named_modules():
                        if isinstance(layer, torch.nn.Linear):
                            key = fastnoise.rng.mix64(4, fastnoise.rng.key_id(name), _DRAW_TAG)
                            layer.weight.copy_(pcm.effective_weight(layer.weight, key, k, t, read))
                    logits.append(chip(batch).logits)
            nll, tokens, _ = fastnoise.lm.token_stats(torch.cat(logits), torch.cat([b[:, 1:] for b in data]))
            want = fastnoise.lm.perplexity(float(nll), float(tokens))
            assert r.accuracies[i][k] == pytest.approx(want, rel=1e-5), (t, k)
            assert want != pytest.approx(fastnoise.lm.perplexity(nll0, tokens0), rel=1e-6)  # the chip shows


def _refused(tmp_path, match, model=None, train=None, val=None, **kw):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        fit(model if model is not None else tiny_llama(), train if train is not None else token_data(16),
            val, spec=SPEC, epochs=1, batch_size=4, out_dir=str(out), messages=lambda m: None, **kw)
    assert not out.exists()  # nothing written


def test_bad_input_is_one_clear_error_before_anything_is_written(tmp_path):
    mixed = token_data(8) + token_data(2, length=9)
    _refused(tmp_path, r"mixed shapes: train_data\[8\]", train=mixed)
    xy = [(torch.randn(4), 1) for _ in range(8)]
    _refused(tmp_path, "task='causal_lm' but train_data", train=xy, task="causal_lm")
    _refused(tmp_path, "vocabulary of 80 tokens, the model 64", method={"name": "kd"},
             teacher=tiny_llama(vocab=80))
    _refused(tmp_path, "sequences of 12 tokens, longer than the model's 10 positions",
             model=tiny_llama(positions=10))
    _refused(tmp_path, "token id 70, past the model's vocabulary of 64", train=token_data(8, vocab=71) + [
        torch.full((12,), 70)])
    _refused(tmp_path, r"val_data\[0\] is tuple, not token ids", val=xy)
    _refused(tmp_path, "method.top_k is for causal LMs", model=torch.nn.Linear(4, 3), train=xy, val=None,
             method={"name": "noise", "top_k": 4})
    _refused(tmp_path, "at least 2", train=[torch.tensor([3]) for _ in range(8)])
    bad_mask = [{"input_ids": s, "attention_mask": s[:5]} for s in token_data(8)]
    _refused(tmp_path, "fields of other lengths", train=bad_mask)


def test_fit_study_of_a_causal_lm(tmp_path):
    """Perplexity under Gaussian noise and (hardware=) on PCM chips over time, paired by seed."""
    from fastnoise.train import fit_study

    out = str(tmp_path / "study")
    teacher = tiny_llama(seed=7)
    times = [1.0, 86400.0]
    study = fit_study(tiny_llama, token_data(32), token_data(8, seed=2), teacher=teacher, seeds=(0, 1),
                      methods=("noise", "kd"), method={"top_k": 8}, hardware="pcm", times=times,
                      draws=2, epochs=1, batch_size=8, out=out, messages=lambda m: None, **SETTINGS)
    assert "perplexity on 88 held-out tokens" in study.tables and "lower is better" in study.tables
    assert all(r.metric == "perplexity" for r in study.results.values())
    with open(os.path.join(out, "accuracies.csv")) as f:
        assert f.readline().strip().endswith(",perplexity")
    d = study.difference("kd", 2)
    assert math.isfinite(d["mean"]) and d["low"] <= d["mean"] <= d["high"]
    # the chip table: perplexity per time, every model on the chips of its seed
    assert "pcm chips over time" in study.tables and "perplexity at t seconds" in study.tables
    assert "| t (s) | teacher | noise | kd |" in study.tables and "| t (s) | kd - noise |" in study.tables
    chip = study.chip
    assert all(r.metric == "perplexity" and r.etas == times for r in chip.results.values())
    assert all(math.isfinite(p) for r in chip.results.values() for a in r.accuracies for p in a)
    rows = _rows(os.path.join(out, "chip_accuracies.csv"))
    assert len(rows) == 3 * 2 * 2 * 2 and "perplexity" in rows[0]
    teacher_chips = copy.deepcopy(teacher)
    fastnoise.convert(teacher_chips, SPEC)
    alone = evaluate_robustness(teacher_chips, DataLoader(token_data(8, seed=2), batch_size=8),
                                hardware="pcm", times=times, draws=2, seed=1, progress=False)
    assert alone.accuracies == chip.results[("teacher", 1)].accuracies  # chips 1 are the seed's
    # resumed: every evaluation read back, the same tables
    again = fit_study(tiny_llama, token_data(32), token_data(8, seed=2), teacher=teacher, seeds=(0, 1),
                      methods=("noise", "kd"), method={"top_k": 8}, hardware="pcm", times=times,
                      draws=2, epochs=1, batch_size=8, out=out, resume=True, messages=lambda m: None,
                      **SETTINGS)
    assert again.tables == study.tables


@pytest.mark.slow
def test_ddp_two_gloo_processes_train_what_one_does(tmp_path):
    from _lm_fit_worker import run
    from _torchrun import assert_ranks_equal, two_ranks

    one = run(str(tmp_path / "one"))
    two = str(tmp_path / "two")
    two_ranks(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lm_fit_worker.py"), two)
    r0 = assert_ranks_equal(two, one.model)
    for key in ("train_loss", "train_kd", "val_ppl", "val_ppl_noisy"):
        assert r0["metrics"][0][key] == pytest.approx(one.history[0][key], rel=1e-4), key
