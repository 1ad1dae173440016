"""Shared fixtures: tiny random bases of each registered architecture, and the real default."""

from __future__ import annotations

import os

import pytest

# Two cores: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Per-session ORT pools, also for CLI commands run in-process: ORT's global pool, once created, makes every
# later session of the process use it, which the tests' own plain sessions do not (test_threads.py covers it
# in subprocesses).
os.environ["SPAF_EDGE_THREAD_POOL"] = "session"

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

    from spaf_edge.core.config import SpAFConfig
    from spaf_edge.model import SpAFModel

    model = SpAFModel(make_tiny_base(model_type, seed, **overrides), spaf_config or SpAFConfig(cutoff_layer=2))
    if randomize:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in model.spaf_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="module")
def single_thread():
    """Run a test on one torch thread.

    Tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP
    threads spin-wait on each other: measured 3-5x slower than one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ARCHITECTURES)
def model_type(request):
    return request.param


@pytest.fixture(scope="session")
def default_base():
    """The embedded SmolLM2-135M-Instruct (converted once and cached)."""
    from spaf_edge.models.loading import load_base_model

    return load_base_model("default")


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer():
    """A character-level fast tokenizer (< 96 ids) with ChatML special tokens and template."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = list(" \n" + string.ascii_letters + string.digits + ".,!?'-:;()")
    vocab = {token: index for index, token in enumerate(specials + chars)}
    assert len(vocab) <= TINY["vocab_size"]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


WORDS = ["the cat", "a dog", "runs", "sleeps", "on the mat", "quickly", "and", "then", "big", "red"]


def write_text_data(path, rows: int = 80, seed: int = 0):
    """A JSONL training file of ``rows`` random eight-phrase sentences (``{"text": ...}`` per line)."""
    import json
    import random
    from pathlib import Path

    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(8)) + "."}) + "\n"
                            for _ in range(rows)))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama folder (config, safetensors, tokenizer, chat template)."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_base("llama", eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
