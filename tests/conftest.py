"""Shared pytest fixtures."""

import os

import pytest
import torch

from helpers import MDISTILLER_STANDIN, drop_fake_mdistiller


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: tiny models run fastest that way, and the CPU is shared.

    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_mdistiller(monkeypatch):
    """The stand-in upstream ``mdistiller`` (tests/mdistiller_standin), freshly imported."""
    drop_fake_mdistiller()
    monkeypatch.syspath_prepend(MDISTILLER_STANDIN)
    import mdistiller

    assert os.path.dirname(mdistiller.__file__) == os.path.join(MDISTILLER_STANDIN, "mdistiller")
    yield mdistiller
    drop_fake_mdistiller()
