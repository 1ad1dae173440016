"""Shared fixtures: tiny random bases of each registered architecture, and the real default."""

from __future__ import annotations

import os

import pytest

# Two cores: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
ARCHITECTURES = ("llama", "qwen2", "mistral")


def make_tiny_base(model_type: str = "llama", seed: int = 0, **overrides):
    """A random fp32 causal LM of the given registered model type (no download)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(TINY, **overrides)
    if model_type in ("mistral", "qwen2"):
        settings.setdefault("sliding_window", None)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def make_tiny_spaf(model_type: str = "llama", seed: int = 0, randomize: bool = True, spaf_config=None, **overrides):
    """A SpAFModel on a tiny base; ``randomize`` gives its modules random (untrained) weights."""
    import torch

    from spaf_edge.config import SpAFConfig
    from spaf_edge.model import SpAFModel

    model = SpAFModel(make_tiny_base(model_type, seed, **overrides), spaf_config or SpAFConfig(cutoff_layer=2))
    if randomize:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in model.spaf_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(params=ARCHITECTURES)
def model_type(request):
    return request.param


@pytest.fixture(scope="session")
def default_base():
    """The embedded SmolLM2-135M-Instruct (converted once and cached)."""
    from spaf_edge.models.loading import load_base_model

    return load_base_model("default")
