"""Shared test setup.

Without a GPU, Triton kernels run on CPU tensors through TRITON_INTERPRET=1 (set here, before
any kernel module is imported). Tests marked ``gpu`` are skipped without CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastnoise  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# where Triton kernels can run in this session
KERNEL_DEVICES = ["cuda"] if HAS_CUDA else ["cpu"]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # a marker, not any node named gpu
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    fastnoise.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Small models: one intra-op thread is as fast on an idle machine and far faster on a busy one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
