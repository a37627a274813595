"""Threads: ``fastnoise.noise(...)`` is per thread, as ``torch.no_grad`` and ``autocast`` are, and
a layer's call counter gives every forward its own value whatever the threads.

The interleavings are forced with events (each step waits for the other thread's), so these
tests fail on a process-wide stack every time, not by chance.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import fastnoise
from fastnoise import NoiseSpec, context

SPEC = NoiseSpec(0.1, "absmax")


def _layer():
    torch.manual_seed(0)
    return fastnoise.Linear(16, 12, spec=SPEC)


def _in_thread(fn):
    """Start ``fn`` in a thread; the returned ``join`` re-raises what it raised."""
    errors = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join():
        t.join(60)
        assert not t.is_alive(), "the other thread did not finish"
        if errors:
            raise errors[0]

    return join


def _wait(event):
    assert event.wait(60), "the other thread did not reach its step"


def test_a_threads_draw_does_not_reach_another_threads_eval_forward():
    layer, x = _layer().eval(), torch.randn(3, 16)
    with torch.no_grad():
        clean = layer(x)
        with fastnoise.noise(draw=3):
            chip3 = layer(x)
    assert not torch.equal(chip3, clean)
    inside, done, seen = threading.Event(), threading.Event(), {}

    def other():
        with torch.no_grad(), fastnoise.noise(draw=3):
            inside.set()
            _wait(done)
            seen["y"] = layer(x)

    join = _in_thread(other)
    _wait(inside)
    assert context.current() is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), clean, rtol=0, atol=0)  # still clean here
    done.set()
    join()
    torch.testing.assert_close(seen["y"], chip3, rtol=0, atol=0)  # and chip 3 there


def test_a_threads_noise_off_does_not_turn_off_another_threads_training_noise():
    layer, x = _layer().train(), torch.randn(3, 16)
    with torch.no_grad():
        clean = torch.nn.functional.linear(x, layer.weight, layer.bias)
    inside, done = threading.Event(), threading.Event()

    def other():
        with fastnoise.noise(enabled=False):
            inside.set()
            _wait(done)

    join = _in_thread(other)
    _wait(inside)
    with torch.no_grad():
        y = layer(x)
    done.set()
    join()
    assert not torch.allclose(y, clean)  # training noise on in this thread
    assert int(layer.noise_calls) == 1


def test_overlapping_blocks_in_two_threads_keep_their_own_settings():
    """A enters draw=2, B enters draw=5, A leaves while B is inside: B still runs on chip 5."""
    layer, x = _layer().eval(), torch.randn(3, 16)
    with torch.no_grad():
        with fastnoise.noise(draw=5):
            chip5 = layer(x)
        with fastnoise.noise(draw=2):
            chip2 = layer(x)
    a_in, b_in, a_out, got = threading.Event(), threading.Event(), threading.Event(), {}

    def thread_a():
        with torch.no_grad(), fastnoise.noise(draw=2):
            a_in.set()
            _wait(b_in)
            got["a"] = layer(x)
        a_out.set()

    def thread_b():
        _wait(a_in)
        with torch.no_grad(), fastnoise.noise(draw=5):
            b_in.set()
            _wait(a_out)
            got["b"] = layer(x)
            got["b_draw"] = context.current().draw
        got["b_after"] = context.current()

    join_a, join_b = _in_thread(thread_a), _in_thread(thread_b)
    join_a()
    join_b()
    torch.testing.assert_close(got["a"], chip2, rtol=0, atol=0)
    assert got["b_draw"] == 5
    torch.testing.assert_close(got["b"], chip5, rtol=0, atol=0)
    assert got["b_after"] is None


def test_threads_training_one_layer_draw_distinct_noise_and_count_every_forward(one_thread):
    """Each forward's output identifies its counter value (the noise of counter c, by the
    single-thread run): the threaded outputs are exactly the outputs of counters 0 .. n-1, each
    once, and the counter ends at n."""
    per_thread, threads = 500, 4
    n = per_thread * threads
    layer, x = _layer().train(), torch.randn(2, 16)
    with torch.no_grad():
        want = {layer(x).numpy().tobytes(): c for c in range(n)}
    assert len(want) == n  # every counter value gives other noise
    fastnoise.manual_seed(0)  # counters back to 0
    outputs = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def train(out):
        start.wait(60)
        with torch.no_grad():
            for _ in range(per_thread):
                out.append(layer(x).numpy().tobytes())

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: a lost update shows at once
    try:
        joins = [_in_thread(lambda o=o: train(o)) for o in outputs]
        for join in joins:
            join()
    finally:
        sys.setswitchinterval(switch)
    got = [b for out in outputs for b in out]
    unknown = sum(b not in want for b in got)
    assert unknown == 0
    counters = sorted(want[b] for b in got)
    shared = len(counters) - len(set(counters))
    assert shared == 0, f"{shared} of {n} forwards drew another forward's noise"
    assert counters == list(range(n))
    assert int(layer.noise_calls) == n


@pytest.mark.parametrize("kind", ["draw", "enabled"])
def test_a_thread_started_inside_a_block_starts_with_no_settings(kind):
    """As with torch.no_grad: a new thread does not inherit the block it was started in."""
    seen = {}
    kwargs = {"draw": 1} if kind == "draw" else {"enabled": False}
    with fastnoise.noise(**kwargs):
        _in_thread(lambda: seen.setdefault("current", context.current()))()
        assert context.current() is not None
    assert seen["current"] is None
