"""The fastnoise command on a causal LM: the ``licenses-llama`` recipe (byte-level license text, a
tiny Llama) through ``train``, ``eval`` (Gaussian noise and PCM chips) and ``study``, in perplexity;
on a small text folder (``--data``) and one training epoch, so each test takes seconds. Bad
settings are one error before anything is written."""

import csv
import os
import sys

import pytest
import torch

from fastnoise.cli import main
from fastnoise.train.data import LICENSE_SEQUENCE, LICENSES_ROOT, license_sequences

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = "licenses-llama"
TEXT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
        "software, to deal in the Software without restriction, subject to the following conditions. ")
# one short epoch for the teacher and the student, 2 chips, 2 etas
TINY = ["teacher.epochs=1", "schedule.epochs=1", "eval.etas=[0.0,0.1]", "eval.draws=2", "eval.epoch_draws=0",
        "--no-progress", "--device", "cpu"]


@pytest.fixture
def text(tmp_path):
    root = tmp_path / "text"
    root.mkdir()
    (root / "a.txt").write_text(TEXT * 40)  # ~8 KB: 135 sequences of 64 bytes
    (root / "b.txt").write_text(TEXT[::-1] * 10)
    return str(root)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_license_sequences_cut_the_bytes_every_tenth_held_out(text):
    train, val = license_sequences(LICENSE_SEQUENCE, text)
    data = open(os.path.join(text, "a.txt"), "rb").read() + open(os.path.join(text, "b.txt"), "rb").read()
    n = len(data) // LICENSE_SEQUENCE
    assert len(train) + len(val) == n and len(val) == (n + 9) // 10
    assert bytes(val[1].tolist()) == data[10 * LICENSE_SEQUENCE:11 * LICENSE_SEQUENCE]
    assert bytes(train[0].tolist()) == data[LICENSE_SEQUENCE:2 * LICENSE_SEQUENCE]
    assert all(s.dtype == torch.long and s.shape == (LICENSE_SEQUENCE,) for s in train + val)
    if os.path.isdir(LICENSES_ROOT):  # Debian's base-files texts, where they are
        t, v = license_sequences()
        assert len(t) > 9 * len(v) - 10 and len(v) > 0


def test_train_then_eval_a_language_model_in_perplexity(tmp_path, text, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--recipe", RECIPE, "--data", text, "--out", run, *TINY]) == 0
    out = capsys.readouterr().out
    assert "licenses-llama: kd on licenses (256 tokens in the vocabulary), tiny_llama" in out
    assert "licenses-llama: perplexity under weight noise" in out and "| 0.1 | 2 |" in out
    assert "val_ppl" in _rows(os.path.join(run, "metrics.csv"))[0]
    trained = _rows(os.path.join(run, "robustness.csv"))
    # eval --run: the run's own table again (the same chips: the run's seed)
    assert main(["eval", "--run", run, "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "perplexity under weight noise" in out and "tokens" in out
    assert _rows(os.path.join(run, "eval", "robustness.csv")) == trained
    # on PCM chips over time
    assert main(["eval", "--run", run, "--hardware", "pcm", "--times", "1", "86400", "--draws", "2",
                 "--out", str(tmp_path / "chips"), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "licenses-llama: perplexity on pcm chips" in out and "| 86400 | 2 |" in out
    rows = _rows(str(tmp_path / "chips" / "robustness.csv"))
    assert [float(r["t"]) for r in rows] == [1.0, 86400.0]
    assert all(1.0 < float(r["mean"]) < float("inf") for r in rows)
    # eval --recipe --weights: the same model file, the same table
    assert main(["eval", "--recipe", RECIPE, "--weights", os.path.join(run, "model.pth"), "--data", text,
                 "--out", str(tmp_path / "again"), "eval.etas=[0.0,0.1]", "eval.draws=2", "--no-progress",
                 "--device", "cpu"]) == 0
    assert _rows(str(tmp_path / "again" / "robustness.csv")) == trained


def test_study_of_a_language_model_with_chips(tmp_path, text, capsys):
    out = str(tmp_path / "study")
    argv = ["study", "--recipe", RECIPE, "--data", text, "--out", out, *TINY, "--seeds", "0", "1", "--etas",
            "0", "0.1", "--draws", "2", "--methods", "noise", "kd", "--hardware", "pcm", "--times", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    tables = open(os.path.join(out, "tables.md")).read()
    assert tables.strip() in printed
    assert "perplexity on " in tables and " held-out tokens of licenses, tiny_llama" in tables
    assert "| eta | teacher | noise | kd |" in tables and "perplexity, lower is better" in tables
    assert "pcm chips over time" in tables and "perplexity at t seconds" in tables
    assert "| t (s) | kd - noise |" in tables
    rows = _rows(os.path.join(out, "accuracies.csv"))
    assert "perplexity" in rows[0] and len(rows) == 3 * 2 * (1 + 2)
    chips = _rows(os.path.join(out, "chip_accuracies.csv"))
    assert "perplexity" in chips[0] and len(chips) == 3 * 2 * 1 * 2
    assert all(1.0 < float(r["perplexity"]) < float("inf") for r in rows + chips)
    # resumed: nothing trained again, the same tables
    assert main([*argv, "--resume"]) == 0
    assert open(os.path.join(out, "tables.md")).read() == tables


@pytest.mark.parametrize("argv, match", [
    (["task=classification"], "model.arch='tiny_llama' is a causal language model: set task=causal_lm"),
    (["model.arch=digits_mlp"], "model.arch='digits_mlp' is a classifier's: task=causal_lm takes"),
    (["data.dataset=digits"], "data.dataset='digits' is a classifier's"),
    (["model.arch=null"], "set both model.arch and data.dataset"),
    (["--data", "MISSING"], "the license texts are not at"),
    (["--data", "EMPTY"], "holds 0 bytes of text in 0 file"),
], ids=["classification", "classifier_arch", "classifier_data", "arch_null", "no_folder", "no_text"])
def test_bad_settings_are_one_error_before_anything_is_written(tmp_path, capsys, argv, match):
    (tmp_path / "empty").mkdir()
    argv = [{"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in argv]
    run = tmp_path / "run"
    assert main(["train", "--recipe", RECIPE, "--out", str(run), *argv, *TINY]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("fastnoise: error:")
    assert not run.exists()


def test_without_transformers_the_error_names_the_package(tmp_path, text, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    run = tmp_path / "run"
    assert main(["train", "--recipe", RECIPE, "--data", text, "--out", str(run), *TINY]) == 2
    err = capsys.readouterr().err
    assert "model.arch=tiny_llama needs the transformers package (pip install transformers)" in err
    assert not run.exists()


def test_a_teacher_file_loads_into_a_model_built_for_real_when_meta_would_leave_buffers_empty():
    """A Llama's rotary frequencies are a non-persistent buffer: a model built on the meta device
    and filled from a file would keep them on meta; a classifier still loads without initialising."""
    from fastnoise.train.models import build_model, build_to_load

    llama, assign = build_to_load("tiny_llama", 256)
    assert not assign and all(b.device.type == "cpu" for b in llama.buffers())
    with torch.device("meta"):
        on_meta = build_model("tiny_llama", 256)
    assert any(b.device.type == "meta" for _, b in on_meta.named_buffers() if _ not in on_meta.state_dict())
    state = torch.get_rng_state()
    mlp, assign = build_to_load("digits_mlp", 10)
    assert assign and next(mlp.parameters()).device.type == "meta"
    build_to_load("tiny_llama", 256)
    assert torch.equal(torch.get_rng_state(), state)  # torch's RNG left as it was
