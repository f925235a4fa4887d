"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def _single_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one torch thread (timings and training comparable under pytest-xdist)."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One torch thread for a whole module, its module-scoped fixtures included (a first training step on
    2 cores is several times slower with more threads)."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """For the command-line tests: a trained tiny digits CNN, a slowed task, an npz file, a loaders module."""
    from cli_helpers import make_workdir

    return make_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def trained():
    """For the ladder tests: a digits CNN of width 8 trained 3 epochs (seed 0), and its data."""
    from adaprune.examples.digits import DigitsCNN, load_digits_data, train

    torch.manual_seed(0)
    data = load_digits_data(0)
    base = DigitsCNN(8)
    train(base, data, epochs=3, seed=0)
    return base, data
