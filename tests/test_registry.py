"""Architecture registry: supported families resolve, others fail naming what is supported."""

from __future__ import annotations

import pytest
from conftest import ARCHITECTURES, make_tiny_base

from spaf_edge.core.errors import UnsupportedArchitectureError
from spaf_edge.models.registry import get_architecture, supported_model_types

pytestmark = pytest.mark.usefixtures("single_thread")


def test_registered_model_types():
    assert set(ARCHITECTURES) <= set(supported_model_types())


def test_accessors_find_the_parts_of_each_family(model_type):
    base = make_tiny_base(model_type)
    arch = get_architecture(base.config)
    assert arch is get_architecture(model_type)
    assert len(arch.layers(base)) == base.config.num_hidden_layers
    assert arch.embed_tokens(base).weight.shape == (base.config.vocab_size, base.config.hidden_size)
    assert arch.lm_head(base).weight.shape == (base.config.vocab_size, base.config.hidden_size)
    assert arch.head_dim(base.config) == base.config.hidden_size // base.config.num_attention_heads
    assert arch.final_norm(base) is base.model.norm
    assert arch.qkv_bias == (arch.layers(base)[0].self_attn.q_proj.bias is not None)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig

    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=4)
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_architecture(config)
    message = str(info.value)
    assert "'gpt2'" in message
    for name in ARCHITECTURES:
        assert name in message


def test_unsupported_architecture_is_refused_by_spaf_model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from spaf_edge.core.config import SpAFConfig
    from spaf_edge.model import SpAFModel

    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        SpAFModel(AutoModelForCausalLM.from_config(config), SpAFConfig(cutoff_layer=1))


def test_sliding_window_is_refused():
    base = make_tiny_base("mistral", sliding_window=16)
    with pytest.raises(UnsupportedArchitectureError, match="sliding_window"):
        get_architecture(base.config)


def test_rope_scaling_is_refused():
    base = make_tiny_base("llama")
    base.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedArchitectureError, match="linear"):
        get_architecture(base.config)
