"""Test tiers. Every test is one of:

- ``core``: the planning core and catalogs; needs only ``pip install -e . pytest`` (rich);
- ``extras``: needs optional packages, named in the marker: ``@pytest.mark.extras("torch", "transformers")``.
  Skipped, saying what to install, where they are missing (the ``profile`` extra: torch, transformers, peft,
  bitsandbytes, accelerate; ``report``: pandas, matplotlib; ``yaml``: pyyaml);
- ``gpu``: needs a CUDA device; skipped without one;
- ``slow`` (on top of the others): minutes rather than seconds; ``-m "not slow"`` leaves them out.

A test file that needs extras says so once with ``pytestmark``; tests without ``extras`` or ``gpu`` are
``core``. ``python -m pytest -m core`` runs the planning tests alone.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches a model hub

from tests.extras import install_hint

def pytest_configure(config):
    for line in ("core: the planning core; needs only rich",
                 "extras(*modules): needs optional packages (skipped, naming them, where they are missing)",
                 "gpu: needs a CUDA device (skipped without one)",
                 "slow: takes minutes; -m 'not slow' leaves it out"):
        config.addinivalue_line("markers", line)


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    cuda = None
    for item in items:
        extras = [m for mark in item.iter_markers("extras") for m in mark.args]
        gpu = item.get_closest_marker("gpu") is not None
        if not extras and not gpu:
            item.add_marker(pytest.mark.core)
        missing = _missing(extras)
        if missing:
            item.add_marker(pytest.mark.skip(reason=install_hint(missing)))
            continue
        if gpu:
            cuda = _cuda() if cuda is None else cuda
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)"))
