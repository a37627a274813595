"""The benchmarks need a CUDA GPU: without one, every test under ``bench/`` is skipped (not failed),
except those marked ``host`` (host-side cost, measured on any machine) or ``cpu`` (the CPU path,
``test_bench_cpu.py``).

    python -m pytest bench/ --benchmark-columns=median,iqr,rounds
"""

import os

import pytest
import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        if item.get_closest_marker("host") is not None or item.get_closest_marker("cpu") is not None:
            continue
        if os.path.abspath(str(item.fspath)).startswith(BENCH_DIR + os.sep):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread(request):
    """The CPU benchmarks (marked ``cpu``) run on one intra-op thread, as their ratios are
    quoted; a test that measures threads sets its own count inside."""
    if request.node.get_closest_marker("cpu") is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
