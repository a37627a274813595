"""Run ``fastnoise`` commands in child processes cheaply, so tests can kill them.

A fresh interpreter spends ~10 s importing torch, torch._dynamo (the optimizers import it),
scikit-learn and matplotlib before a digits run starts. :class:`Runner` starts one
``multiprocessing`` forkserver that imports them once; each command then runs in a fork of it:
a real, separate process (its own pid, killed for real by ``FASTNOISE_FAULT`` or ``os.kill``)
that starts in milliseconds. The server never runs a torch op, so the forks inherit no thread
pool.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

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
