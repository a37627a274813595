"""``fastnoise.train.fit`` on a user's own model (``_fit_worker.UserNet``) and ``TensorDataset``s:
every method resumes exactly (2N steps = N + resume + N, weights and logs bit for bit), the
teacher and the model are left as documented, a ``DataLoader`` works with its resume limit, a
bad setting is an error naming it, and 2 gloo processes train what 1 does."""

import csv
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from _fit_worker import SETTINGS, UserNet, make_data, make_model, make_teacher, run
from _torchrun import assert_ranks_equal, two_ranks
from torch.utils.data import DataLoader

import fastnoise
from fastnoise.convert import noisy_layers
from fastnoise.train import ConfigError, fit

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["clean", "noise", "kd", "consistency"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _rows(path, drop=()):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _same_run(a: str, b: str, wa: dict, wb: dict) -> None:
    """Two run folders (and their final weights) hold the same run."""
    steps = _rows(os.path.join(a, "steps.csv"))
    assert steps == _rows(os.path.join(b, "steps.csv"))
    assert len(steps) == 8 and len({r["loss"] for r in steps}) == 8
    ma, mb = (_rows(os.path.join(d, "metrics.csv"), drop=("seconds",)) for d in (a, b))
    assert ma == mb and len(ma) == 2
    assert _rows(os.path.join(a, "robustness.csv")) == _rows(os.path.join(b, "robustness.csv"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _weights(result):
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_resumes_exactly(tmp_path, method):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    a = run(full, method)
    assert not a.stopped and a.global_step == 8 and a.epochs_done == 2 and a.out_dir == full
    assert [r["epoch"] for r in a.history] == [1, 2] and a.robustness is not None
    for name in ("config.yaml", "last.pt", "best.pt", "model.pth", "metrics.json", "robustness.png"):
        assert os.path.isfile(os.path.join(full, name)), name
    part = run(split, method, stop_at_step=6)  # inside the second epoch
    assert part.stopped and part.global_step == 6 and part.robustness is None
    assert not os.path.exists(os.path.join(split, "model.pth"))
    b = run(split, method, resume=True)
    assert b.global_step == 8
    _same_run(full, split, _weights(a), _weights(b))
    # the noise the trained model draws is the run's: every noisy layer was used once a step
    noise = fastnoise.noise_state_dict(b.model)
    steps_with_noise = 0 if method == "clean" else 8
    assert set(noise) == {"body.1", "head"} and all(s["calls"] == steps_with_noise for s in noise.values())
    loss_keys = {"clean": "train_ce", "noise": "train_ce", "kd": "train_kd",
                 "consistency": "train_consistency"}
    assert loss_keys[method] in a.history[0]
    if method == "consistency":  # the hooks came off, in the stopped run too
        for m in (a.model, part.model, b.model):
            assert not any(x._forward_hooks for x in m.modules())


@pytest.mark.slow
def test_dropout_resumes_exactly_after_the_process_drew_on(tmp_path):
    """torch's RNG (dropout's masks) and the noise seed come back from the checkpoint: reseeded
    and drawn from in between, the resumed run is still the one that did not stop."""
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    a = run(full, "noise", dropout=0.3)
    run(split, "noise", dropout=0.3, stop_at_step=6)
    torch.manual_seed(999)
    fastnoise.manual_seed(999)
    torch.rand(5)
    b = run(split, "noise", dropout=0.3, resume=True)
    _same_run(full, split, _weights(a), _weights(b))
    c = run(str(tmp_path / "plain"), "noise")  # dropout is on in training: the masks move the run
    assert _rows(os.path.join(full, "steps.csv")) != _rows(os.path.join(str(tmp_path / "plain"), "steps.csv"))
    assert not torch.equal(_weights(a)["head.weight"], _weights(c)["head.weight"])


@pytest.mark.slow
def test_resume_in_a_fresh_process(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    a = run(full, "kd")
    run(split, "kd", stop_at_step=3)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, os.path.join(HERE, "_fit_worker.py"), split, "kd", "resume"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.load(open(os.path.join(split, "rank0.json")))
    weights = {k: torch.tensor(v) for k, v in info["weights"].items()}
    _same_run(full, split, _weights(a), weights)


def test_the_teacher_is_left_alone(tmp_path):
    teacher = make_teacher()
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    modes = {n: m.training for n, m in teacher.named_modules()}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train, val = make_data()
    settings = SETTINGS
    r = fit(make_model(), train, val, method="kd", teacher=teacher, messages=lambda m: None, **settings)
    assert r.history[-1]["train_kd"] > 0
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == flags
    assert flags["head.weight"] is False and flags["body.1.weight"] is True
    assert {n: m.training for n, m in teacher.named_modules()} == modes and teacher.training
    assert not noisy_layers(teacher)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a student copied from the teacher trains (its parameters are not frozen by the run)
    student = make_teacher()
    student.head.weight.requires_grad_(True)
    r = fit(student, train, val, method="kd", teacher=teacher, messages=lambda m: None, **settings)
    assert not torch.equal(student.head.weight.detach(), before["head.weight"])


def test_without_out_dir_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    train, val = make_data()
    settings = {k: v for k, v in SETTINGS.items() if k != "epochs"}
    model = make_model()
    r = fit(model, train, None, method="noise", epochs=1, messages=lambda m: None, **settings)
    assert r.out_dir is None and r.model is model and r.global_step == 4
    assert os.listdir(tmp_path) == []  # the temporary run folder is gone
    assert "val_top1" not in r.history[0] and r.robustness is None  # no validation data
    assert fastnoise.noise_state_dict(model)["head"]["calls"] == 4


def _loader_run(out, **kw):
    train, val = make_data()
    torch.manual_seed(5)  # fit seeds torch's RNG itself; this shows it does
    settings = {k: v for k, v in SETTINGS.items() if k != "batch_size"}
    settings.update(kw)
    loader = DataLoader(train, batch_size=64, shuffle=True)
    return fit(make_model(), loader, DataLoader(val, batch_size=32), method="noise", out_dir=out,
               messages=lambda m: None, **settings)


@pytest.mark.slow
def test_a_dataloader_resumes_at_epoch_ends(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    a = _loader_run(full)
    assert a.global_step == 8
    part = _loader_run(split, stop_at_step=4)
    assert part.stopped and part.epochs_done == 1
    b = _loader_run(split, resume=True)
    _same_run(full, split, _weights(a), _weights(b))
    # the order follows fit's seed (torch.manual_seed(seed) before training), not the caller's RNG
    ref = _loader_run(str(tmp_path / "again"))
    assert torch.equal(_weights(ref)["head.weight"], _weights(a)["head.weight"])
    with pytest.raises(ConfigError, match="stop_at_step=6 is not at an epoch end"):
        _loader_run(str(tmp_path / "mid"), stop_at_step=6)
    with pytest.raises(ConfigError, match="checkpoint.every_steps must be 0"):
        _loader_run(str(tmp_path / "every"), checkpoint={"every_steps": 2})
    with pytest.raises(ConfigError, match="batch_size=64 with a DataLoader"):
        _loader_run(str(tmp_path / "bs"), batch_size=64)
    assert not os.path.exists(tmp_path / "mid") and not os.path.exists(tmp_path / "every")


def _labels(val, value):
    return torch.utils.data.TensorDataset(val.tensors[0], torch.full((len(val),), value))


def _inputs(val, shape):
    return torch.utils.data.TensorDataset(torch.zeros(len(val), *shape), val.tensors[1])


# (changes to fit's arguments, the error's text); "val" is a function of the validation set
BAD = [
    ({"optim": {"lrr": 0.1}}, "unknown configuration key 'optim.lrr'"),
    ({"optim_lr": 0.1}, "unknown configuration key 'optim_lr'"),
    ({"optim": {"lr": -1}}, "optim.lr must be > 0"),
    ({"schedule": {"epochs": 3}}, "schedule.epochs is fit's argument epochs="),
    ({"data": {"root": "somewhere"}}, "data.root is not a setting of fit"),
    ({"method": "kd"}, "method 'kd' needs a teacher"),
    ({"method": "bad"}, "method must be one of"),
    ({"method": "consistency"}, "method.layers is empty"),
    ({"method": {"name": "consistency", "layers": ["nope"]}}, "no module named 'nope' in the model"),
    ({"method": {"name": "kd", "temperatur": 2}}, "unknown configuration key 'method.temperatur'"),
    ({"teacher": "make"}, "a teacher is for method 'kd'"),
    ({"spec": fastnoise.NoiseSpec(eta=0.1), "noise": {"eta": 0.2}}, "noise.eta is set twice"),
    ({"val": lambda v: _labels(v, 9)}, "labels must be integers in \\[0, 4\\)"),
    ({"val": lambda v: _inputs(v, (1, 5, 5))}, "the model does not take val_data\\[0\\]'s input"),
    ({"out_dir": None, "resume": True}, "resume=True needs out_dir"),
]


@pytest.mark.parametrize("change, match", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_arguments_name_what_is_wrong(tmp_path, change, match):
    train, val = make_data()
    out = str(tmp_path / "run")
    kw = {"method": "noise", "epochs": 1, "batch_size": 64, "messages": lambda m: None,
          "log": {"progress": False}, "out_dir": out}
    change = dict(change)
    if "val" in change:
        val = change.pop("val")(val)
    if change.get("teacher") == "make":
        change["teacher"] = make_teacher()
    kw.update(change)
    with pytest.raises(ConfigError, match=match):
        fit(make_model(), train, val, **kw)
    assert not os.path.exists(out)  # checked before anything is written


@pytest.mark.slow
def test_two_gloo_processes_train_what_one_does(tmp_path):
    one = run(str(tmp_path / "one"), "noise", epochs=1)
    two = str(tmp_path / "two")
    two_ranks(os.path.join(HERE, "_fit_worker.py"), two, "noise", "1epoch")
    r0 = assert_ranks_equal(two, one.model)
    assert r0["metrics"][0]["train_loss"] == pytest.approx(one.history[0]["train_loss"], rel=1e-4)
    assert r0["metrics"][0]["val_top1"] == pytest.approx(one.history[0]["val_top1"], abs=1e-9)


# ----------------------------------------------------------------------------- the study on fit
def _study(out, model, data=None, **kw):
    from fastnoise.train import fit_study

    train, val = data or make_data()
    settings = {k: v for k, v in SETTINGS.items() if k not in ("epochs", "eval")}
    settings.update(kw)
    return fit_study(model, train, val, out=out, seeds=(0, 1), draws=2, epochs=1,
                     method={"layers": ["body"]}, messages=lambda m: None,
                     eval={"epoch_draws": 0}, **settings)


def test_fit_study_on_a_model_builder(tmp_path):
    out = str(tmp_path / "study")
    st = _study(out, UserNet, teacher_epochs=1)
    assert st.models == ["teacher", "clean", "noise", "kd", "consistency"]
    assert st.etas == [0.0, 0.05, 0.1, 0.15]
    for m in st.models[1:]:
        for s in (0, 1):
            run = os.path.join(out, f"seed{s}", m)
            last = _rows(os.path.join(run, "metrics.csv"))[-1]
            # the study's clean pass is the run's own last validation: the trained weights were read back
            assert st.results[(m, s)].accuracies[0] == [pytest.approx(float(last["val_top1"]), abs=1e-9)]
            assert len(st.results[(m, s)].accuracies[2]) == 2
    # seeds differ (initial weights, order, noise): not one model twice
    assert st.results[("noise", 0)].accuracies != st.results[("noise", 1)].accuracies
    assert "noise-only" in st.tables and os.path.isfile(os.path.join(out, "tables.md"))
    rows = _rows(os.path.join(out, "accuracies.csv"))
    assert len(rows) == 5 * 2 * (1 + 3 * 2)
    # resume: nothing is trained again, the same tables
    stamp = os.path.getmtime(os.path.join(out, "seed1", "kd", "model.pth"))
    again = _study(out, UserNet, teacher_epochs=1, resume=True)
    assert again.tables == st.tables
    assert os.path.getmtime(os.path.join(out, "seed1", "kd", "model.pth")) == stamp
    with pytest.raises(ConfigError, match="already exists"):
        _study(out, UserNet, teacher_epochs=1)
    with pytest.raises(ConfigError, match="its config differ"):
        _study(out, UserNet, teacher_epochs=1, resume=True, optim={"lr": 0.01})
    other_structure = r"the model is not the study's \(its state: \['body.1.weight', \[16, 64\]"
    with pytest.raises(ConfigError, match=other_structure):
        _study(out, lambda: UserNet(width=16), teacher_epochs=1, resume=True)


def test_fit_study_on_a_model_to_copy_and_a_given_teacher(tmp_path):
    teacher = make_teacher()
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = _study(str(tmp_path / "s"), model, teacher=teacher, methods=("noise", "kd"))
    assert st.models == ["teacher", "noise", "kd"]
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == flags and not noisy_layers(teacher)
    assert not noisy_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a resume must be given the same model, teacher and data
    other_teacher = make_teacher()
    with torch.no_grad():
        other_teacher.head.bias[0] += 1e-3
    train, val = make_data()
    refused = [({"model": make_model(seed=5)}, "the model to copy holds other weights"),
               ({"teacher": other_teacher}, "the teacher is not the study's"),
               ({"data": (torch.utils.data.Subset(train, range(200)), val)},
                "the training data has 200 samples, the study's had 256"),
               ({"data": (train, torch.utils.data.Subset(val, range(10)))}, "the validation data has 10")]
    for change, match in refused:
        given = {"model": model, "teacher": teacher, **change}
        with pytest.raises(ConfigError, match=match):
            _study(str(tmp_path / "s"), given.pop("model"), methods=("noise", "kd"), resume=True, **given)
    again = _study(str(tmp_path / "s"), model, teacher=teacher, methods=("noise", "kd"), resume=True)
    assert again.tables == st.tables
    with pytest.raises(ConfigError, match="needs a teacher"):
        _study(str(tmp_path / "t"), model)
    with pytest.raises(ConfigError, match="seed is set by the study"):
        _study(str(tmp_path / "t"), model, teacher=teacher, seed=3)
    assert not os.path.exists(tmp_path / "t")


def test_fit_study_on_chips_over_time(tmp_path):
    """hardware=: every model also on the chips of its seed at each time, the same chips as
    evaluate_robustness(..., seed=s) gives it; the chip tables, CSV and plot are written, the
    settings saved and checked on resume; bad input is one error before anything is written."""
    from fastnoise.train.study import MARKER

    out = str(tmp_path / "s")
    teacher = make_teacher()
    times = [1.0, 86400.0]
    st = _study(out, make_model(), teacher=teacher, methods=("noise", "kd"), hardware="pcm", times=times)
    chip = st.chip
    assert chip is not None and chip.etas == times and chip.models == ["teacher", "noise", "kd"]
    assert "pcm chips over time" in st.tables and "| t (s) | teacher | noise | kd |" in st.tables
    assert "| t (s) | kd - noise |" in st.tables and "| 86400 |" in st.tables
    rows = _rows(os.path.join(out, "chip_accuracies.csv"))
    assert len(rows) == 3 * 2 * 2 * 2 and set(rows[0]) == {"model", "seed", "chips", "t", "draw", "top1"}
    assert os.path.getsize(os.path.join(out, "chip.png")) > 0
    with open(os.path.join(out, MARKER)) as f:
        assert json.load(f)["hardware"]["times"] == times
    # the pairing: each model of seed s met chips s, whatever the model (the teacher and a student
    # measured again here, alone, on chips s)
    _, val = make_data()
    loader = DataLoader(val, batch_size=256)
    for name, s in (("teacher", 1), ("noise", 0), ("kd", 1)):
        if name == "teacher":
            m = fastnoise.convert(make_teacher(), SETTINGS["spec"])
        else:
            m = fastnoise.convert(make_model(), SETTINGS["spec"])
            m.load_state_dict(torch.load(os.path.join(out, f"seed{s}", name, "model.pth"), weights_only=True))
        alone = fastnoise.evaluate_robustness(m, loader, hardware=fastnoise.PCM(), times=times, draws=2,
                                              seed=s, progress=False)
        assert alone.accuracies == chip.results[(name, s)].accuracies, name
    assert chip.results[("teacher", 0)].accuracies != chip.results[("teacher", 1)].accuracies  # new chips
    # resumed: read back, the same tables; other times are refused
    again = _study(out, make_model(), teacher=teacher, methods=("noise", "kd"), hardware="pcm", times=times,
                   resume=True)
    assert again.tables == st.tables
    with pytest.raises(ConfigError, match="its hardware differ"):
        _study(out, make_model(), teacher=teacher, methods=("noise", "kd"), hardware="pcm", times=[1.0],
               resume=True)
    with pytest.raises(ConfigError, match="its hardware differ"):  # without hardware
        _study(out, make_model(), teacher=teacher, methods=("noise", "kd"), resume=True)
    for kw, match in (({"times": [5.0]}, "give hardware too"),
                      ({"hardware": "pcm", "times": [1.0, -1.0]}, "got -1.0"),
                      ({"hardware": "rram"}, "unknown hardware model 'rram'"),
                      ({"hardware": "pcm", "times": []}, "times is empty"),
                      ({"hardware": 3}, "hardware must be a hardware model or its name, got 3")):
        with pytest.raises(ConfigError, match=match):
            _study(str(tmp_path / "bad"), make_model(), teacher=teacher, methods=("noise", "kd"), **kw)
        assert not os.path.exists(tmp_path / "bad")
