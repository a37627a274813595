"""Run ``fastnoise`` commands in child processes cheaply, so tests can kill them; compare run folders.

A fresh interpreter spends ~10 s importing torch, torch._dynamo (the optimizers import it),
scikit-learn and matplotlib before a digits run starts. :class:`Runner` starts one
``multiprocessing`` forkserver that imports them once; each command then runs in a fork of it:
a real, separate process (its own pid, killed for real by ``FASTNOISE_FAULT`` or ``os.kill``)
that starts in milliseconds. The server never runs a torch op, so the forks inherit no thread
pool.

:func:`assert_same_run` checks that a run folder holds what an uninterrupted run wrote: the same
files (no temporary ones), logs equal but for wall-clock seconds, tensors bit for bit.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import sys
import time

import torch

# 5 steps per epoch, 3 epochs; a log row every 2 steps and at each epoch's end, a checkpoint every
# 3 steps inside an epoch and at each epoch's end; noisy validation, so best.pt follows the noisy score
RUN = ["train", "--recipe", "digits", "--no-progress", "--device", "cpu", "model.arch=digits_mlp",
       "model.init=null", "method.name=noise", "noise.eta=0.1", "data.batch_size=256", "schedule.epochs=3",
       "log.every=2", "checkpoint.every_steps=3", "eval.etas=[0.0, 0.1]", "eval.draws=2",
       "eval.epoch_draws=1"]
RESUME = ["train", "--resume", "--no-progress", "--device", "cpu"]
FILES = ["best.pt", "config.yaml", "last.pt", "metrics.csv", "metrics.json", "model.pth", "robustness.csv",
         "robustness.png", "steps.csv"]

PRELOAD = ["torch", "torch._dynamo", "sklearn.datasets", "matplotlib.pyplot", "tqdm.auto", "yaml",
           "fastnoise.cli", "fastnoise.train.trainer", "fastnoise.train.demo", "fastnoise.train.runfolder"]


def _child(argv, cwd, env, log_path):
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    import torch

    torch.set_num_threads(1)
    from fastnoise.cli import main

    sys.argv = ["fastnoise", *argv]  # as the console script would see it (the lock file records it)

    try:
        code = main(list(argv))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class Job:
    def __init__(self, process, log_path):
        self.process, self.log_path = process, log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        """``(exit code, output)``; the code is ``-9`` for a SIGKILL."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"command did not finish in {timeout} s:\n{self.output()}")
        return self.process.exitcode, self.output()

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_stopped(self, timeout: float = 120) -> None:
        """Wait until the process has stopped itself (``FASTNOISE_FAULT=...:stop``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                raise AssertionError(f"process ended before it stopped:\n{self.output()}") from None
            if state == "T":
                return
            time.sleep(0.02)
        raise TimeoutError(f"process did not stop in {timeout} s:\n{self.output()}")

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


class Runner:
    """``Runner(tmp).run(["train", ...], fault="after:last.pt:2")`` -> ``(exit code, output)``."""

    _count = 0

    def __init__(self, logs: str):
        self.logs = logs
        os.makedirs(logs, exist_ok=True)
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)

    def start(self, argv, cwd, fault=None, env=None) -> Job:
        Runner._count += 1
        log_path = os.path.join(self.logs, f"job{Runner._count}.log")
        full_env = {"FASTNOISE_FAULT": fault, "OMP_NUM_THREADS": "1", **(env or {})}
        p = self.ctx.Process(target=_child, args=(list(argv), str(cwd), full_env, log_path))
        p.start()
        return Job(p, log_path)

    def run(self, argv, cwd, fault=None, env=None, timeout: float = 300) -> tuple[int, str]:
        return self.start(argv, cwd, fault, env).wait(timeout)


# ----------------------------------------------------------------------------- comparing run folders
def _rows(path, drop=("seconds",)):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def _same(a, b, where=""):
    """Equal, tensors bit for bit, ignoring the wall-clock ``seconds`` of metrics rows."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        keys = set(a) - {"seconds"}
        assert keys == set(b) - {"seconds"}, f"{where}: {sorted(keys ^ (set(b) - {'seconds'}))}"
        for k in keys:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def assert_same_run(folder, ref, files=FILES):
    """``folder`` holds what the uninterrupted ``ref`` holds, and nothing else (no temporary files)."""
    from fastnoise.train import runfolder as rf

    assert rf.user_entries(folder) == sorted(files)
    assert [n for n in os.listdir(folder) if n not in files] == [rf.LOCK_NAME]
    for name in ("config.yaml", "steps.csv", "robustness.csv", "robustness.png"):
        if name in files:
            assert read_bytes(os.path.join(folder, name)) == read_bytes(os.path.join(ref, name)), name
    assert _rows(os.path.join(folder, "metrics.csv")) == _rows(os.path.join(ref, "metrics.csv"))
    _same(*[json.load(open(os.path.join(d, "metrics.json"))) for d in (folder, ref)])
    for name in ("last.pt", "best.pt", "model.pth"):
        if name in files:
            _same(torch.load(os.path.join(folder, name), weights_only=True),
                  torch.load(os.path.join(ref, name), weights_only=True), name)
