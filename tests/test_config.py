"""SpAFConfig: JSON round trip, depth-dependent defaults, and a clear ConfigError per bad setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spaf_edge.core.config import CONFIG_FILE, SpAFConfig
from spaf_edge.core.errors import ConfigError


def test_json_round_trip_keeps_every_setting(tmp_path):
    config = SpAFConfig(
        cutoff_layer=3, adapter_layers=[2, 3], adapter_dim_ratio=0.5, alignment_loss_type="cosine",
        num_draft_tokens=6, serial_parallel_transition=3, draft_stop_threshold=0.2,
        temperature=0.7, top_p=0.9, top_k=20, draft_vocab_size=1000,
    )
    config.alignment_head.num_layers = 3
    config.loss_weights.alignment = 0.5
    written = config.save(tmp_path)
    assert written == tmp_path / CONFIG_FILE
    loaded = SpAFConfig.load(tmp_path)
    assert loaded == config
    assert SpAFConfig.from_dict(json.loads(written.read_text())) == config


def test_resolved_fills_cutoff_and_adapter_layers_from_depth():
    resolved = SpAFConfig().resolved(num_layers=30)
    assert resolved.cutoff_layer == 15
    assert resolved.adapter_layers == [15]
    assert SpAFConfig(cutoff_layer=4, adapter_layers=[6, 2]).resolved(8).adapter_layers == [2, 4, 6]


@pytest.mark.parametrize("cutoff", [0, 8, 9, -1])
def test_cutoff_outside_1_to_L_minus_1_is_rejected(cutoff):
    with pytest.raises(ConfigError, match=r"cutoff_layer.*1\.\.7"):
        SpAFConfig(cutoff_layer=cutoff).resolved(num_layers=8)


@pytest.mark.parametrize("cutoff", [1, 7])
def test_cutoff_range_ends_are_accepted(cutoff):
    assert SpAFConfig(cutoff_layer=cutoff).resolved(num_layers=8).cutoff_layer == cutoff


def test_adapter_layer_outside_range_is_rejected():
    with pytest.raises(ConfigError, match="adapter_layers"):
        SpAFConfig(cutoff_layer=2, adapter_layers=[2, 8]).resolved(num_layers=8)


BAD_SETTINGS = [
    ({"adapter_dim_ratio": 0}, "adapter_dim_ratio"),
    ({"adapter_dim_ratio": -0.1}, "adapter_dim_ratio"),
    ({"adapter_dim_ratio": "big"}, "adapter_dim_ratio"),
    ({"alignment_head": {"hidden_dim_ratio": 0}}, "alignment_head.hidden_dim_ratio"),
    ({"alignment_head": {"num_layers": 0}}, "alignment_head.num_layers"),
    ({"alignment_head": {"depth": 2}}, "alignment_head"),
    ({"alignment_head": 3}, "alignment_head"),
    ({"loss_weights": {"alignment": -1}}, "loss_weights.alignment"),
    ({"loss_weights": {"alignment": "x"}}, "loss_weights.alignment"),
    ({"alignment_loss_type": "l1"}, "alignment_loss_type"),
    ({"num_draft_tokens": 0}, "num_draft_tokens"),
    ({"num_draft_tokens": 3, "serial_parallel_transition": -1}, "serial_parallel_transition"),
    ({"num_draft_tokens": 3, "serial_parallel_transition": 4}, "serial_parallel_transition"),
    ({"num_draft_tokens": 3, "serial_parallel_transition": 1.5}, "serial_parallel_transition"),
    ({"draft_stop_threshold": 1.0}, "draft_stop_threshold"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"cutoff_layer": 0}, "cutoff_layer"),
    ({"cutoff_layer": "3"}, "cutoff_layer"),
    ({"adapter_layers": 3}, "adapter_layers"),
    ({"draft_vocab_size": 1}, "draft_vocab_size"),
    ({"alignment_rollout_steps": 0}, "alignment_rollout_steps"),
]


@pytest.mark.parametrize("settings,name", BAD_SETTINGS, ids=[name for _, name in BAD_SETTINGS])
def test_bad_setting_raises_config_error_naming_it(settings, name):
    with pytest.raises(ConfigError) as info:
        SpAFConfig.from_dict(settings)
    assert name in str(info.value)


def test_valid_edge_values_are_accepted():
    config = SpAFConfig.from_dict(
        {"num_draft_tokens": 4, "serial_parallel_transition": 4, "top_p": 1.0, "top_k": 0, "temperature": 0}
    )
    assert config.greedy
    assert SpAFConfig.from_dict({"num_draft_tokens": 1, "serial_parallel_transition": 1}).num_draft_tokens == 1


def test_unknown_key_lists_valid_settings():
    with pytest.raises(ConfigError, match=r"Unknown SpAF config setting\(s\): cutof_layer.*Valid settings:.*cutoff_layer"):
        SpAFConfig.from_dict({"cutof_layer": 3})


def test_bad_json_file(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SpAFConfig.load(tmp_path)


def test_json_that_is_not_an_object(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        SpAFConfig.load(tmp_path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        SpAFConfig.load(tmp_path / "nowhere")


def test_replace_validates():
    with pytest.raises(ConfigError, match="serial_parallel_transition"):
        SpAFConfig().replace(num_draft_tokens=1)
    assert SpAFConfig().replace(num_draft_tokens=1, serial_parallel_transition=1).num_draft_tokens == 1


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("spaf_*.json")),
                         ids=lambda path: path.name)
def test_shipped_configs_load_for_the_default_model(path):
    """Every config in configs/ is one `train --config` takes for SmolLM2 (30 layers)."""
    config = SpAFConfig.load(path).resolved(30)
    assert config.cutoff_layer in config.adapter_layers
    if config.adapter_kind == "layer_fusion":
        assert config.fused_layers(30) == [25]
