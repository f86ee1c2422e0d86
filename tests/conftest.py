"""Test-wide setup: Triton runs in its interpreter without CUDA; unwritten memory reads as NaN."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

_empty = torch.empty


def _nan_empty(*args, **kwargs):
    # Poison fresh buffers so a kernel that forgets to write an element fails loudly.
    t = _empty(*args, **kwargs)
    if t.is_floating_point():
        with torch.no_grad():  # a leaf made with requires_grad (torch's checkpoint makes one)
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _nan_empty)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
