"""Shared helpers: tiny models from the debug presets."""

from __future__ import annotations

import pytest
import torch

import multimodal_moe as mm

DEBUG_PRESETS = [name for name in mm.list_presets() if "debug" in name]


def tiny(preset: str = "beit3/debug", *overrides: str, seed: int = 0):
    """(config, model) of a debug preset with overrides, built deterministically."""
    cfg = mm.load_config(preset, overrides)
    return cfg, mm.build_model(cfg, seed=seed)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
