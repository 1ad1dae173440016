"""`spaf-edge generate` and `spaf-edge info` end to end on a saved tiny model folder."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from spaf_edge.cli import main
from spaf_edge.core.config import SpAFConfig
from spaf_edge.model import SpAFModel
from spaf_edge.models.loading import load_base_model
from spaf_edge.prompts import encode_prompt

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "Hello there, tiny model."


def invoke(*args, input=None):
    return CliRunner().invoke(main, [str(arg) for arg in args], input=input)


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    """Random (untrained) SpAF components for the tiny folder, saved like `train` does."""
    model = SpAFModel.from_pretrained(tiny_model_dir, SpAFConfig(cutoff_layer=1, num_draft_tokens=3))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.spaf_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.save_spaf_components(tmp_path_factory.mktemp("ckpt") / "components")


def hf_greedy_text_ids(folder, text: str, max_new_tokens: int) -> list[int]:
    base, tokenizer = load_base_model(folder)
    ids = encode_prompt(tokenizer, text)
    with torch.no_grad():
        out = base.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_generate_greedy_json_equals_hf(tiny_model_dir, checkpoint):
    expected = hf_greedy_text_ids(tiny_model_dir, PROMPT, 24)
    for extra in ([], ["--components", checkpoint], ["-N", "4", "-s", "2", "--draft-stop-threshold", "0.01"]):
        result = invoke("generate", "--base-model", tiny_model_dir, "--prompt", PROMPT, "--max-new-tokens", 24,
                        "--json-output", *extra)
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert payload["tokens"] == expected
        assert payload["stats"]["new_tokens"] == len(expected)
        assert isinstance(payload["text"], str)


def test_generate_text_output_and_stats_on_stderr(tiny_model_dir):
    result = invoke("generate", "--base-model", tiny_model_dir, "--max-new-tokens", 6, input=PROMPT)
    assert result.exit_code == 0, result.output
    assert "[spaf]" in result.stderr and "tau=" in result.stderr
    assert "[spaf]" not in result.stdout


def test_generate_sampling_is_reproducible_with_a_seed(tiny_model_dir, checkpoint):
    args = ["generate", "--base-model", tiny_model_dir, "--components", checkpoint, "--prompt", PROMPT,
            "--max-new-tokens", 16, "--temperature", 1.0, "--top-k", 20, "--json-output"]
    first = invoke(*args, "--seed", 3)
    second = invoke(*args, "--seed", 3)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["tokens"] == json.loads(second.stdout)["tokens"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--num-draft-tokens", 0], "num_draft_tokens"),
        (["-N", 2, "-s", 3], "serial_parallel_transition"),
        (["--temperature", -1], "temperature"),
        (["--max-new-tokens", 1000], "exceeds the context"),
        (["--cutoff-layer", 9], "cutoff_layer"),
    ],
)
def test_generate_bad_settings_fail_with_a_clear_message(tiny_model_dir, args, message):
    result = invoke("generate", "--base-model", tiny_model_dir, "--prompt", PROMPT, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_generate_missing_base_model(tmp_path):
    result = invoke("generate", "--base-model", tmp_path / "nothing", "--prompt", PROMPT)
    assert result.exit_code != 0
    assert "not found" in result.output


def test_info_describes_a_checkpoint(checkpoint):
    result = invoke("info", checkpoint)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "checkpoint"
    assert info["config"]["cutoff_layer"] == 1
    assert info["config"]["num_draft_tokens"] == 3
    assert info["model_type"] == "llama"
    assert info["trainable_parameters"] > 0
    assert len(info["base_fingerprint"]) == 16


def test_info_on_a_folder_that_is_not_spaf(tmp_path):
    result = invoke("info", tmp_path)
    assert result.exit_code != 0
    assert "neither a SpAF checkpoint" in result.output
