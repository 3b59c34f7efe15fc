"""Strict config loading: presets, extends, overrides, and one test per validation rule."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

import multimodal_moe as mm
from multimodal_moe.config import resolve_preset
from multimodal_moe.configurable import ConfigError, parse, to_dict
from multimodal_moe.layers.ffn import DenseFFNConfig
from multimodal_moe.models import DecoderLMConfig, MultiwayEncoderConfig


def error(preset: str, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        mm.load_config(preset, overrides)
    return info.value


@pytest.mark.parametrize("name", mm.list_presets())
def test_every_preset_loads_and_round_trips(name):
    cfg = mm.load_config(name)
    assert parse(mm.Config, to_dict(cfg)) == cfg
    import yaml

    assert parse(mm.Config, yaml.safe_load(mm.dump_config(cfg))) == cfg


def test_preset_names_resolve_in_every_spelling():
    expected = mm.load_config("configs/beit3/debug.yaml")
    assert mm.load_config("beit3/debug") == expected
    assert mm.load_config("beit3/debug.yaml") == expected


def test_extends_inherits_and_overrides():
    base, large, giant = (mm.load_config(f"beit3/{s}").model for s in ("base", "large", "giant"))
    assert (large.depth, large.dim, large.heads, large.ffn.hidden_dim) == (24, 1024, 16, 4096)
    assert (giant.depth, giant.dim, giant.heads, giant.ffn.hidden_dim, giant.patch_size) == (40, 1408, 16, 6144, 14)
    assert large.vocab_size == base.vocab_size == 64010 and large.ffn.activation == "gelu"
    paper = mm.load_config("beit3/large_paper").model
    assert paper.layout == "paper" and paper.vl_ffn_layers == 3 and paper.depth == 24


def test_a_mapping_with_another_kind_replaces_its_parent(tmp_path):
    (tmp_path / "child.yaml").write_text(textwrap.dedent("""
        extends: parent.yaml
        model: {kind: decoder_lm, depth: 2, dim: 32, heads: 2, ffn: {kind: dense, hidden_dim: 64}, vocab_size: 50}
    """))
    (tmp_path / "parent.yaml").write_text(textwrap.dedent("""
        seed: 7
        model: {kind: multiway_encoder, layout: paper, depth: 4, dim: 64, heads: 4, ffn: {kind: dense, hidden_dim: 8}}
    """))
    cfg = mm.load_config(tmp_path / "child.yaml")
    assert isinstance(cfg.model, DecoderLMConfig) and cfg.model.depth == 2 and cfg.seed == 7


def test_overrides_are_typed():
    cfg = mm.load_config("beit3/debug", ["model.depth=5", "model.drop_path=0", "model.ffn.activation=swiglu",
                                         "model.grad_checkpointing=true", "seed=3"])
    assert cfg.model.depth == 5 and cfg.seed == 3 and cfg.model.grad_checkpointing is True
    assert cfg.model.drop_path == 0.0 and isinstance(cfg.model.drop_path, float)
    assert cfg.model.ffn == DenseFFNConfig(hidden_dim=128, activation="swiglu")


def test_exponent_floats_without_a_point_are_numbers(tmp_path):
    # PyYAML reads 3e-4 as a string (YAML 1.1 wants 3.0e-4); a float field takes it as the number
    cfg = mm.load_config("beit3/debug", ["train.lr=3e-4", "train.min_lr=1E-6", "train.eps=+2.5e-8"])
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.eps) == (3e-4, 1e-6, 2.5e-8)
    (tmp_path / "run.yaml").write_text("extends: " + str(resolve_preset("beit3/debug")) + "\ntrain: {lr: 1e-3}\n")
    assert mm.load_config(tmp_path / "run.yaml").train.lr == 1e-3
    with pytest.raises(ConfigError, match=r"model\.drop_path: must be in \[0, 1\), got -0\.1"):
        mm.load_config("beit3/debug", ["model.drop_path=-1e-1"])  # read as a number, then range-checked
    for text in ("1e", "e-4", "3e-4x", "nan", "1e-4.5"):
        with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
            mm.load_config("beit3/debug", [f"train.lr={text}"])


@pytest.mark.parametrize("override, key, words", [
    ("model.depth=four", "model.depth", "expected an integer"),
    ("model.depth=2.5", "model.depth", "expected an integer"),
    ("model.dim=true", "model.dim", "expected an integer"),
    ("model.sub_ln=1", "model.sub_ln", "expected true or false"),
    ("model.drop_path=fast", "model.drop_path", "expected a number"),
    ("model.ffn=3", "model.ffn", "expected a mapping"),
    ("model.vision_ffn=[1]", "model.vision_ffn", "expected"),
])
def test_wrong_type_names_the_key(override, key, words):
    err = error("beit3/debug", override)
    assert err.key == key and words in err.message and key in str(err)


def test_unknown_key_lists_valid_keys():
    err = error("beit3/debug", "model.dept=3")
    assert err.key == "model.dept"
    assert "did you mean 'depth'" in err.message and "vl_ffn_layers" in err.message and "heads" in err.message
    assert error("beit3/debug", "trainer.lr=1").key == "trainer"
    assert error("beit3/debug", "model.ffn.width=3").key == "model.ffn.width"


def test_unknown_kind_lists_valid_kinds():
    err = error("beit3/debug", "model.ffn.kind=switch")
    assert err.key == "model.ffn.kind" and "'switch'" in err.message and "dense" in err.message
    err = error("beit3/debug", "model.kind=vit")
    assert err.key == "model.kind" and "multiway_encoder" in err.message and "decoder_lm" in err.message


def test_missing_key(tmp_path):
    (tmp_path / "lm.yaml").write_text("model: {kind: decoder_lm, depth: 1, dim: 8, heads: 2, vocab_size: 9, "
                                      "ffn: {kind: dense}}\n")
    err = error(tmp_path / "lm.yaml")
    assert err.key == "model.ffn.hidden_dim" and "missing" in err.message
    err = error(tmp_path / "lm.yaml", "model.ffn={hidden_dim: 3}", "model.ffn.kind=null")
    assert err.key == "model.ffn" and "missing 'kind'" in err.message
    assert error(tmp_path / "lm.yaml", "model.ffn.hidden_dim=4", "model.vocab_size=null").key == "model.vocab_size"


@pytest.mark.parametrize("override, key, words", [
    ("model.heads=5", "model.heads", "dim 64 is not divisible by heads 5"),
    ("model.depth=0", "model.depth", "positive"),
    ("model.drop_path=1.5", "model.drop_path", "[0, 1)"),
    ("model.norm_eps=0", "model.norm_eps", "positive"),
    ("model.layout=hybrid", "model.layout", "'decoupled', 'paper'"),
    ("model.norm=batchnorm", "model.norm", "'layernorm', 'rmsnorm'"),
    ("model.attention_backend=flash", "model.attention_backend", "'auto', 'sdpa', 'xformers'"),
    ("model.patch_size=7", "model.patch_size", "not divisible"),
    ("model.vocab_size=0", "model.vocab_size", "positive"),
    ("model.vl_ffn_layers=1", "model.vl_ffn_layers", "decoupled layout has no VL-FFN"),
    ("model.vision_language_ffn={kind: dense, hidden_dim: 8}", "model.vision_language_ffn", "decoupled"),
    ("model.ffn.hidden_dim=0", "model.ffn.hidden_dim", "positive"),
    ("model.ffn.dropout=1.0", "model.ffn.dropout", "[0, 1)"),
    ("model.ffn.activation=tanh", "model.ffn.activation", "'swiglu'"),
])
def test_encoder_validation_names_the_key(override, key, words):
    err = error("beit3/debug", override)
    assert err.key == key and words in err.message


def test_paper_layout_validation():
    err = error("beit3/debug_paper", "model.vl_ffn_layers=4")
    assert err.key == "model.vl_ffn_layers" and "depth 3" in err.message
    err = error("beit3/debug_paper", "model.vl_ffn_layers=0", "model.vision_language_ffn={kind: dense, hidden_dim: 8}")
    assert err.key == "model.vision_language_ffn" and "no layer would use it" in err.message


def test_lm_validation():
    err = error("lm/debug", "model.dim=60", "model.heads=4")
    assert err.key == "model.positions" and "even head dim" in err.message
    assert error("lm/debug", "model.max_seq_len=-1").key == "model.max_seq_len"
    assert error("lm/debug", "model.positions=alibi").key == "model.positions"


def test_xformers_backend_requires_xformers(monkeypatch):
    monkeypatch.setattr("multimodal_moe.models.base.xformers_installed", lambda: False)
    err = error("beit3/debug", "model.attention_backend=xformers")
    assert err.key == "model.attention_backend" and "not installed" in err.message


def test_bad_override_syntax_and_files(tmp_path):
    assert error("beit3/debug", "model.depth").key == "--set"
    with pytest.raises(FileNotFoundError, match="beit3/debug"):
        mm.load_config("beit3/no_such_preset")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    assert "cycle" in error(tmp_path / "a.yaml").message
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    assert error(tmp_path / "c.yaml").key == "extends"
    (tmp_path / "d.yaml").write_text("- 1\n- 2\n")
    assert "mapping" in error(tmp_path / "d.yaml").message


def test_configs_built_in_python_are_checked_and_frozen():
    with pytest.raises(ConfigError) as info:
        DenseFFNConfig(hidden_dim=-1)
    assert info.value.key == "hidden_dim"
    cfg = MultiwayEncoderConfig(depth=2, dim=64, heads=4, ffn=DenseFFNConfig(hidden_dim=8))
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(cfg, heads=3)
    assert info.value.key == "heads"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depth = 3


FAMILY = '''
from multimodal_moe.configurable import Registry

class Thing(Registry):
    pass

Thing.register_lazy("late", "late_thing:LateThing")
Thing.register_lazy("broken", "late_thing:Missing")
'''
LATE = '''
from multimodal_moe.configurable import config
from thing_family import Thing

@Thing.register("late")
@config
class LateThing(Thing):
    size: int = 1
'''


def test_a_lazy_kind_loads_its_module_when_a_config_names_it(tmp_path, monkeypatch):
    import sys

    (tmp_path / "thing_family.py").write_text(FAMILY)
    (tmp_path / "late_thing.py").write_text(LATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from thing_family import Thing

    assert Thing.kind_names() == ["broken", "late"] and "late_thing" not in sys.modules
    with pytest.raises(ConfigError, match="unknown kind 'early'; valid kinds: broken, late"):
        parse(Thing, {"kind": "early"})
    thing = parse(Thing, {"kind": "late", "size": 3})
    assert type(thing).__module__ == "late_thing" and thing.size == 3 and to_dict(thing) == {"kind": "late", "size": 3}
    with pytest.raises(ImportError, match=r"late_thing:Missing does not register Thing kind 'broken'"):
        parse(Thing, {"kind": "broken"})
    with pytest.raises(ValueError, match="registered twice"):
        Thing.register_lazy("late", "elsewhere:LateThing")
    monkeypatch.delitem(sys.modules, "thing_family")
    monkeypatch.delitem(sys.modules, "late_thing")
