"""``spaf-edge run`` and ``spaf-edge validate`` on a tiny exported model (saved like a real one)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_base, make_tiny_tokenizer

from spaf_edge.cli import main
from spaf_edge.core.config import SpAFConfig
from spaf_edge.exporters import export_model
from spaf_edge.model import SpAFModel
from spaf_edge.runtime import Engine

pytestmark = pytest.mark.usefixtures("single_thread")


def randomize(model: SpAFModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.spaf_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Saved base folder, SpAF components, other components, and the export made from them."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = make_tiny_tokenizer()
    base = make_tiny_base("llama", hidden_size=64, eos_token_id=tokenizer.eos_token_id)
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = SpAFModel.from_pretrained(root / "base", SpAFConfig(cutoff_layer=2, num_draft_tokens=3))
    randomize(model, 1)
    model.save_spaf_components(root / "components")
    export_model(model, root / "export", progress=False)
    randomize(model, 2)
    model.save_spaf_components(root / "other_components")
    return root


def invoke(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def test_run_streams_the_engine_text(tiny):
    engine = Engine.from_folder(tiny / "export")
    expected = engine.generate("Hello", max_new_tokens=10)
    result = invoke("run", tiny / "export", "--prompt", "Hello", "--max-new-tokens", 10, "--stats")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected.text + "\n"
    assert "tau=" in result.stderr and "verify steps" in result.stderr
    assert f"lossless: {engine.lossless} (" in result.stderr  # whether SpAF's tokens are exact on this device
    assert f"decoding: {engine.settings().describe()}\n" in result.stderr
    options = invoke("run", tiny / "export", "--prompt", "Hello", "--max-new-tokens", 4, "--stats",
                     "--num-draft-tokens", 2, "--draft-stop-threshold", 0.25, "--proposers", "spaf")
    chosen = engine.settings(num_draft_tokens=2, draft_stop_threshold=0.25, proposers="spaf").describe()
    assert chosen.startswith("spaf, N=2 s=") and "eta=0.25" in chosen and f"decoding: {chosen}\n" in options.stderr
    piped = invoke("run", tiny / "export", "--stdin", "--max-new-tokens", 10, input="Hello")
    assert piped.stdout == result.stdout


def test_run_json_output_and_options(tiny):
    engine = Engine.from_folder(tiny / "export")
    expected = engine.generate("Hi", max_new_tokens=8, temperature=0.7, seed=4, chat=False, mode="greedy")
    result = invoke("run", tiny / "export", "--prompt", "Hi", "--raw", "--max-new-tokens", 8, "--temperature", 0.7,
                    "--seed", 4, "--mode", "greedy", "--threads", 1, "--json-output")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"] == expected.tokens and data["text"] == expected.text
    assert data["stats"]["verify_steps"] == len(expected.tokens)
    assert data["lossless"] == engine.lossless


def test_run_chat_loop_keeps_the_conversation(tiny):
    engine = Engine.from_folder(tiny / "export")
    first = engine.generate("Hi", max_new_tokens=6)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.text},
                    {"role": "user", "content": "More"}]
    second = engine.generate(engine.tokenizer.encode_chat(conversation), max_new_tokens=6)
    result = invoke("run", tiny / "export", "--chat-loop", "interactive", "--max-new-tokens", 6, input="Hi\nMore\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first.text}\n{second.text}\n"


def test_run_reports_bad_options(tiny):
    result = invoke("run", tiny / "export", "--prompt", "Hi", "--provider", "cuda")
    assert result.exit_code != 0 and "CUDAExecutionProvider" in result.output and "available" in result.output
    result = invoke("run", tiny / "export", "--prompt", "Hi", "--top-p", 0)
    assert result.exit_code != 0 and "Invalid top_p=0.0" in result.output
    result = invoke("run", tiny / "export", "--prompt", "Hi", "--stdin")
    assert result.exit_code != 0 and "not both" in result.output
    result = invoke("run", tiny / "missing", "--prompt", "Hi")
    assert result.exit_code != 0 and "does not exist" in result.output


def test_validate_passes_with_the_components(tiny):
    result = invoke("validate", tiny / "export", "--base-model", tiny / "base", "--components", tiny / "components",
                    "--max-new-tokens", 12, "--json-output")
    assert result.exit_code == 0, result.output
    assert "graph parity" in result.stdout and "RESULT: PASS" in result.stdout
    assert result.stdout.count(" PASS: 12 tokens") + result.stdout.count(" PASS: ") >= 6  # six built-in prompts
    parity = json.loads(result.stdout.strip().splitlines()[-1])
    assert parity["passed"] and {"lower", "upper", "drafter", "draft_head"} == set(parity["per_graph"])


def test_validate_without_components_judges_tokens_and_backbone(tiny):
    result = invoke("validate", tiny / "export", "--base-model", tiny / "base", "--prompt", "Hello there",
                    "--max-new-tokens", 10)
    assert result.exit_code == 0, result.output
    assert "no --components" in result.stdout and "RESULT: PASS" in result.stdout


def test_validate_judges_a_quantized_export_against_its_own_plain_greedy(tiny, tmp_path):
    """An int4 export is another model than the float base: SpAF must equal the export's plain greedy."""
    model = SpAFModel.from_pretrained(tiny / "base", components=tiny / "components")
    export_model(model, tmp_path / "int4", quantization="int4", progress=False)
    result = invoke("validate", tmp_path / "int4", "--base-model", tiny / "base", "--components",
                    tiny / "components", "--max-new-tokens", 12, "--no-parity")
    assert result.exit_code == 0, result.output
    assert "engine SpAF == engine plain greedy (quantized export)" in result.stdout
    assert "float base" in result.stdout and "RESULT: PASS" in result.stdout


def test_validate_fails_on_other_components(tiny):
    result = invoke("validate", tiny / "export", "--base-model", tiny / "base", "--components",
                    tiny / "other_components", "--prompt", "Hi", "--max-new-tokens", 6)
    assert result.exit_code == 1
    assert "graph parity" in result.stdout and "FAIL" in result.stdout and "RESULT: FAIL" in result.stdout


def test_validate_refuses_another_base_model(tiny, tmp_path):
    other = make_tiny_base("llama", seed=7, hidden_size=64)
    other.save_pretrained(tmp_path / "other")
    make_tiny_tokenizer().save_pretrained(tmp_path / "other")
    result = invoke("validate", tiny / "export", "--base-model", tmp_path / "other", "--no-parity")
    assert result.exit_code != 0
    assert "fingerprint" in result.output and "Pass the base model the export was made from" in result.output
