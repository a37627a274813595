"""Fault injection: a run killed at any write (before, in the middle of, right after each file:
config, checkpoint, best, logs, final weights, robustness table), or at a random step, resumes to
the very files an uninterrupted run writes (bit for bit on the CPU); two writers; a full disk.

Commands run in forks of one preloaded server (``_fault_harness.Runner``): real processes, killed
by ``FASTNOISE_FAULT`` (:mod:`fastnoise.train.runfolder`), at ~1 s each instead of ~10 s.
"""

import json
import os
import random
import shutil
import socket
import subprocess

import pytest
import torch
from _fault_harness import FILES, RESUME, RUN, Runner, assert_same_run, read_bytes

from fastnoise.cli import main
from fastnoise.train import runfolder as rf

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(str(tmp_path_factory.mktemp("logs")))


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory):
    """An uninterrupted run, and the fault points it passed, in order."""
    root = tmp_path_factory.mktemp("ref")
    trace = str(root / "trace.txt")
    code, out = runner.run([*RUN, "--out", "run"], root, env={"FASTNOISE_FAULT_TRACE": trace})
    assert code == 0, out
    with open(trace) as f:
        points = [line.strip() for line in f]
    return str(root / "run"), points


def _base(point):
    """``after:run/last.pt`` (as traced) -> ``after:last.pt`` (as FASTNOISE_FAULT takes it)."""
    stage, _, path = point.partition(":")
    return f"{stage}:{os.path.basename(path)}" if path else stage


def _continue(runner, folder, cwd, fault=None):
    """What a user does after a crash: --resume if the folder has settings, else start again."""
    if os.path.isfile(os.path.join(folder, "config.yaml")):
        return runner.run([*RESUME, "--out", folder], cwd, fault)
    return runner.run([*RUN, "--out", folder], cwd, fault)


def _assert_consistent(folder):
    """After a kill: every file there is whole, and last.pt / best.pt hold finite weights."""
    for name in rf.user_entries(folder):
        p = os.path.join(folder, name)
        if name.endswith((".pt", ".pth")):
            state = torch.load(p, weights_only=True)
            assert rf.first_nonfinite(state) is None, name
        elif name == "config.yaml":
            rf.load_complete_config(p)
        elif name == "metrics.json":
            json.load(open(p))


# every write point of the run, each hit once in a fresh process (its first hit after the resume),
# in the order a run reaches them; the comments say where each kill lands
CHAIN = [
    "before:config.yaml",   # nothing written yet: the same command starts again
    "temp:config.yaml",     # a stray temporary file, removed by the next start
    "after:config.yaml",    # settings but no checkpoint: --resume starts at step 0
    "torn:steps.csv",       # half a log row (step 2), no checkpoint
    "temp:last.pt",         # the step-3 checkpoint not yet renamed
    "after:last.pt",        # checkpoint at step 3
    "after:steps.csv",      # the step-4 row, newer than the checkpoint: dropped on resume
    "before:metrics.csv",   # epoch 1 done, nothing of it written
    "after:metrics.json",   # epoch 1's metrics written, its checkpoint not
    "temp:best.pt",
    "after:best.pt",        # best.pt of epoch 1 ahead of last.pt (step 3): the epoch is redone
    "before:last.pt",       # the end-of-epoch-1 checkpoint
    "temp:last.pt",
    "after:last.pt",        # checkpoint at step 5
    "step:3",               # step 8, after the step-6 checkpoint
    "after:best.pt",        # epoch 2's best.pt, last.pt at step 9
    "torn:steps.csv",
    "before:model.pth",     # training done (last.pt at step 15), no final weights
    "temp:model.pth",
    "after:model.pth",      # final weights, no robustness table
    "temp:robustness.csv",
    "after:robustness.csv",
    "temp:robustness.png",
    "after:robustness.png",  # everything written, killed before exit
]


def test_kill_at_every_write_then_resume_equals_the_uninterrupted_run(runner, reference, tmp_path):
    ref, points = reference
    reached = {_base(t) for t in points}
    for p in CHAIN:
        assert p.split(":")[0] == "step" or p in reached, f"{p} is not a point the run reaches"
    folder = str(tmp_path / "run")
    for point in CHAIN:
        code, out = _continue(runner, folder, tmp_path, fault=point)
        assert code == -9, f"FASTNOISE_FAULT={point} did not kill the run (exit {code}):\n{out}"
        _assert_consistent(folder)
    code, out = _continue(runner, folder, tmp_path)
    assert code == 0, out
    assert_same_run(folder, ref)


def test_kill_at_random_points_then_resume(runner, reference, tmp_path):
    """Kills drawn (seeded) from every point an uninterrupted run passes, each then resumed once."""
    ref, points = reference
    picks = sorted(random.Random(12).sample(range(len(points)), 6))
    for i in picks:
        point = _base(points[i])
        n = sum(1 for p in points[:i + 1] if p == points[i])
        folder = str(tmp_path / f"kill{i}")
        code, out = runner.run([*RUN, "--out", folder], tmp_path, fault=f"{point}:{n}")
        assert code == -9, f"{point}:{n}: {out}"
        _assert_consistent(folder)
        code, out = _continue(runner, folder, tmp_path)
        assert code == 0, f"{point}:{n}: {out}"
        assert_same_run(folder, ref)


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f != rf.LOCK_NAME:
                out[os.path.relpath(os.path.join(d, f), root)] = read_bytes(os.path.join(d, f))
    return out


def test_a_second_writer_is_refused_and_names_the_first(runner, reference, tmp_path):
    ref, _ = reference
    folder = str(tmp_path / "run")
    first = runner.start([*RUN, "--out", folder], tmp_path, fault="after:last.pt:2:stop")
    first.wait_stopped()  # holds the lock, mid-run (after the end-of-epoch-1 checkpoint)
    before = _snapshot(folder)
    for extra in ([*RUN, "--out", folder], [*RUN, "--out", folder, "--overwrite"],
                  [*RESUME, "--out", folder]):
        code, out = runner.run(extra, tmp_path)
        assert code == 2, out
        assert out.startswith("fastnoise: error: "), out
        assert f"is in use by process {first.pid} on {socket.gethostname()}" in out, out
        assert "--out " + folder in out and "started " in out, out  # its command line and start time
        assert _snapshot(folder) == before  # nothing written, nothing deleted
    first.cont()
    code, out = first.wait()
    assert code == 0, out
    assert_same_run(folder, ref)  # one run's rows only, not two interleaved


def test_the_lock_is_taken_before_anything_is_written(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with rf.RunLock(str(folder)):  # held by this process, through another open file
        for args in ([*RUN, "--out", str(folder), "--overwrite"], [*RUN, "--out", str(folder)]):
            capsys.readouterr()
            assert main(args) == 2
            err = capsys.readouterr().err
            assert err.startswith("fastnoise: error: ") and f"process {os.getpid()}" in err, err
    assert sorted(os.listdir(folder)) == [rf.LOCK_NAME, "notes.txt"]


def test_simulated_full_disk_names_it_and_the_folder_resumes(runner, reference, tmp_path):
    ref, _ = reference
    folder = str(tmp_path / "run")
    code, out = runner.run([*RUN, "--out", folder], tmp_path, fault="temp:last.pt:4:enospc")
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.startswith("fastnoise: error: ")]
    assert len(lines) == 1 and "no space left on device" in lines[0] and "last.pt" in lines[0], out
    assert "Traceback" not in out
    assert not [n for n in os.listdir(folder) if ".tmp" in n]
    code, out = _continue(runner, folder, tmp_path)
    assert code == 0, out
    assert_same_run(folder, ref)


def _mount_tmpfs(path, size):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root")
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def test_a_real_full_disk(runner, reference, tmp_path):
    """A 128 KiB tmpfs fills up at the first end-of-epoch checkpoint (~40 KiB files); once it is
    made larger, --resume finishes the run as if nothing happened."""
    ref, _ = reference
    disk = str(tmp_path / "disk")
    _mount_tmpfs(disk, "128k")
    try:
        folder = os.path.join(disk, "run")
        code, out = runner.run([*RUN, "--out", folder], tmp_path)
        assert code == 2, out
        assert out.count("fastnoise: error: ") == 1 and "no space left on device" in out, out
        assert "Traceback" not in out
        assert not [n for n in os.listdir(folder) if ".tmp" in n]
        _assert_consistent(folder)
        subprocess.run(["mount", "-o", "remount,size=4m", disk], check=True)
        code, out = _continue(runner, folder, tmp_path)
        assert code == 0, out
        assert_same_run(folder, ref)
    finally:
        subprocess.run(["umount", disk], check=False)


def test_diverging_run_stops_and_keeps_the_last_finite_checkpoint(runner, tmp_path):
    folder = str(tmp_path / "run")
    code, out = runner.run([*RUN, "--out", folder, "optim.name=sgd", "optim.lr=1000"], tmp_path)
    assert code == 2, out
    err = [line for line in out.splitlines() if line.startswith("fastnoise: error: ")]
    assert len(err) == 1 and "Traceback" not in out, out
    assert "training diverged at step 8 (epoch 2)" in err[0] and "optim.lr=1000 is too large" in err[0], err
    assert "last.pt keeps step 6" in err[0]
    state = torch.load(os.path.join(folder, "last.pt"), weights_only=True)
    assert state["global_step"] == 6 and rf.first_nonfinite(state) is None
    assert not os.path.exists(os.path.join(folder, "model.pth"))


def test_weights_that_go_bad_between_loss_checks_are_not_saved(runner, tmp_path):
    """No loss is looked at before step 5 (log.every=100); the step-3 checkpoint checks the weights."""
    folder = str(tmp_path / "run")
    code, out = runner.run([*RUN, "--out", folder, "optim.name=sgd", "optim.lr=1e30", "log.every=100"],
                           tmp_path)
    assert code == 2, out
    assert "training diverged at step 3 (epoch 1)" in out and "is not finite" in out, out
    assert "No checkpoint was written from non-finite weights" in out
    assert not os.path.exists(os.path.join(folder, "last.pt"))


def test_resume_without_any_checkpoint_starts_at_step_zero(runner, reference, tmp_path):
    ref, _ = reference
    folder = str(tmp_path / "run")
    code, out = runner.run([*RUN, "--out", folder], tmp_path, fault="torn:steps.csv:1")  # step 2
    assert code == -9
    assert sorted(rf.user_entries(folder)) == ["config.yaml", "steps.csv"]
    code, out = _continue(runner, folder, tmp_path)
    assert code == 0 and "from step 0" in out, out
    assert_same_run(folder, ref)


def test_the_comparison_sees_a_one_value_difference(reference, tmp_path):
    """assert_same_run can fail: one changed weight, or one changed log value, is caught."""
    ref, _ = reference
    for name in ("model.pth", "steps.csv"):
        copy = tmp_path / name
        shutil.copytree(ref, copy)
        p = copy / name
        if name == "model.pth":
            state = torch.load(p, weights_only=True)
            state["fc.bias"][3] = torch.nextafter(state["fc.bias"][3], torch.tensor(1.0))
            torch.save(state, p)
        else:
            p.write_text(p.read_text().replace(",0.002\n", ",0.0020001\n", 1))
        with pytest.raises(AssertionError):
            assert_same_run(str(copy), ref)


def test_kills_inside_the_teacher_run_resume_to_the_same_teacher_and_student(runner, tmp_path):
    """KD with a clean teacher trained first in RUN/teacher: kills in the teacher's run and at its
    final weights, then --resume of the student's folder, equal an uninterrupted run."""
    kd = [*RUN[:6], "model.arch=digits_mlp", "method.name=kd", "teacher.epochs=1", "noise.eta=0.1",
          "data.batch_size=256", "schedule.epochs=1", "checkpoint.every_steps=2", "eval.etas=[0.0, 0.1]",
          "eval.draws=2", "eval.epoch_draws=1"]
    ref, folder = str(tmp_path / "ref"), str(tmp_path / "run")
    code, out = runner.run([*kd, "--out", ref], tmp_path)
    assert code == 0, out
    code, out = runner.run([*kd, "--out", folder], tmp_path, fault="after:teacher/last.pt:1")
    assert code == -9, out
    for point in ("torn:teacher/steps.csv", "temp:teacher/model.pth", "after:teacher/robustness.png"):
        code, out = runner.run([*RESUME, "--out", folder], tmp_path, fault=point)
        assert code == -9, f"{point}: {out}"
    code, out = runner.run([*RESUME, "--out", folder], tmp_path)
    assert code == 0, out
    assert_same_run(os.path.join(folder, "teacher"), os.path.join(ref, "teacher"))
    assert_same_run(folder, ref, files=[*FILES, "teacher"])

    # --overwrite with other settings, killed while it deletes the old run: never half an old
    # teacher (its folder is renamed away in one step), and the next --overwrite ends as a fresh run
    new = [*kd, "teacher.lr=0.01", "--overwrite"]
    fresh = str(tmp_path / "fresh")
    code, out = runner.run([*new[:-1], "--out", fresh], tmp_path)
    assert code == 0, out
    for point in ("delete:teacher", "delete:best.pt"):
        code, out = runner.run([*new, "--out", folder], tmp_path, fault=point)
        assert code == -9, f"{point}: {out}"
        assert not os.path.exists(os.path.join(folder, "teacher", "model.pth"))
    code, out = runner.run([*new, "--out", folder], tmp_path)
    assert code == 0, out
    assert_same_run(os.path.join(folder, "teacher"), os.path.join(fresh, "teacher"))
    assert_same_run(folder, fresh, files=[*FILES, "teacher"])
