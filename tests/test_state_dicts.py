"""The one strict-load reporter (``multimodal_moe.state_dicts``) and the checkpoint loader on it:
every missing, unexpected and wrongly shaped key named as its source names it, tied weights
stored once still loading."""

from __future__ import annotations

import pytest
import torch

import multimodal_moe as mm
from multimodal_moe.state_dicts import compare_state, listing
from multimodal_moe.training import CheckpointError
from multimodal_moe.training.checkpoint import load_weights


def test_compare_state_names_every_problem_as_the_source_does():
    state = {"a": torch.zeros(2), "b": torch.zeros(3), "skip.me": torch.zeros(1), "extra": torch.zeros(1)}
    expected = {"a": (2,), "b": (4,), "c": (5,)}
    found = compare_state(state, expected, name_of=lambda k: f"src.{k}", ignore=lambda k: k.startswith("skip."))
    assert (found.missing, found.unexpected) == (["src.c"], ["src.extra"])
    assert found.wrong_shape == ["src.b (3,) (expected (4,))"]
    assert str(found) == "missing: src.c; unexpected: src.extra; shape mismatch: src.b (3,) (expected (4,))"
    assert not compare_state({"a": torch.zeros(2)}, {"a": torch.Size([2])})


def test_long_listings_are_cut_with_a_count():
    assert listing([f"k{i:02d}" for i in range(15)], limit=3) == "k00, k01, k02 ... (15 in all)"


def test_a_checkpoint_loads_tied_weights_stored_once_and_names_what_does_not_fit():
    model = mm.build_model(mm.load_config("lm/debug"))  # output projection tied to the embedding
    state = model.state_dict()
    tied = [k for k, v in state.items() if any(v.data_ptr() == w.data_ptr() and k != j for j, w in state.items())]
    assert len(tied) == 2  # the embedding and the output projection, one tensor
    once = {k: v.clone() for k, v in state.items() if k != tied[1]}
    fresh = mm.build_model(mm.load_config("lm/debug", ["seed=3"]))
    load_weights(fresh, once, "ckpt")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    name = next(k for k in once if k.endswith("norm.weight"))
    with pytest.raises(CheckpointError, match=rf"ckpt does not fit the model: shape mismatch: {name} \(3,\)"):
        load_weights(fresh, {**once, name: torch.zeros(3)}, "ckpt")
    with pytest.raises(CheckpointError, match=r"missing: .*; unexpected: stray"):
        load_weights(fresh, {**{k: v for k, v in once.items() if k != name}, "stray": torch.zeros(1)}, "ckpt")
