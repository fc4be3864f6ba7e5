import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts live at the top of the repo

PATIENCE = 1800  # seconds a test's command may take: a hang, never a slow or busy machine, fails it


@pytest.fixture
def auto_is_not_the_cpu(monkeypatch):
    """Device "auto" (or none) resolves to a stand-in for a GPU: "meta", where any computation fails, as a GPU
    machine resolves it to its GPU. A test using it shows that every call it makes names the device it means (the
    suite's exact checks hold on the CPU; tests/test_accelerator.py is its GPU part)."""
    pick = importlib.import_module("utils").pick_device

    def stand_in(name=None):
        return torch.device("meta") if name in (None, "auto") else pick(name)

    for module in ("utils", "ddpm", "evaluate", "benchmark"):
        monkeypatch.setattr(importlib.import_module(module), "pick_device", stand_in)
