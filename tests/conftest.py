"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one torch thread (timings and training comparable under pytest-xdist)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """For the command-line tests: a trained tiny digits CNN, a slowed task, an npz file, a loaders module."""
    from cli_helpers import make_workdir

    return make_workdir(tmp_path_factory)
