"""`spaf-edge distill` and `spaf-edge train` end to end on a tiny saved model folder."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from spaf_edge.cli import main
from spaf_edge.model import SpAFModel

pytestmark = pytest.mark.usefixtures("single_thread")


def invoke(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result


def last_json(output):
    return json.loads(output[output.index("{"):])


def test_distill_then_train_then_resume(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": f"Tell me about item {i} and its color.", "source": "test", "license": "CC0"}) + "\n"
        for i in range(8)
    ))
    data = tmp_path / "distilled.jsonl"
    result = invoke("distill", "--prompts", prompts, "--out", data, "--base-model", tiny_model_dir,
                    "--backend", "torch", "--max-new-tokens", 8, "--batch-size", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["written"] == 8
    assert len(data.read_text().splitlines()) == 8

    run_dir = tmp_path / "run"
    common = ["--base-model", tiny_model_dir, "--out", run_dir, "--no-progress"]
    result = invoke("train", *common, "--data", data, "--cutoff-layer", 2, "--steps", 4, "--batch-size", 2,
                    "--seq-len", 16, "--save-every", 2, "--eval-every", 2, "--draft-vocab-size", 20,
                    "--logit-chunk-rows", 8)
    assert result.exit_code == 0, result.output
    summary = last_json(result.output)
    assert summary["steps"] == 4 and summary["tokens_per_second"] > 0
    assert {"total", "adapter_kl/2", "align_state/2", "align_token_kl/2"} <= set(summary["train_losses"])
    model = SpAFModel.from_pretrained(tiny_model_dir, components=run_dir / "final")
    assert model.cutoff == 2 and model.draft_vocab.numel() == 20
    assert invoke("info", run_dir / "final").exit_code == 0

    result = invoke("train", *common, "--data", data)
    assert result.exit_code != 0 and "--resume" in result.output
    result = invoke("train", *common, "--resume", "--seq-len", 32)
    assert result.exit_code != 0 and "seq_len" in result.output

    result = invoke("train", *common, "--resume", "--steps", 6)
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["steps"] == 6
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 7))

    # A new run fine-tuning the trained components: their config, weights and draft vocabulary, fresh optimizer.
    tuned_dir = tmp_path / "tuned"
    result = invoke("train", "--base-model", tiny_model_dir, "--out", tuned_dir, "--no-progress", "--data", data,
                    "--init-from", run_dir / "final", "--cutoff-layer", 3)
    assert result.exit_code != 0 and "--init-from keeps" in result.output
    result = invoke("train", "--base-model", tiny_model_dir, "--out", tuned_dir, "--no-progress", "--data", data,
                    "--init-from", run_dir / "final", "--steps", 1, "--batch-size", 2, "--seq-len", 16,
                    "--eval-every", 1, "--lr", 1e-9, "--warmup", 0)
    assert result.exit_code == 0, result.output
    started = SpAFModel.from_pretrained(tiny_model_dir, components=run_dir / "final")
    tuned = SpAFModel.from_pretrained(tiny_model_dir, components=tuned_dir / "final")
    assert tuned.cutoff == 2 and tuned.draft_vocab.tolist() == started.draft_vocab.tolist()
    for name, value in started.spaf_state_dict().items():  # lr 1e-9: one step leaves the weights where they were
        torch.testing.assert_close(tuned.spaf_state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    saved = json.loads((tuned_dir / "settings.json").read_text())
    assert saved["train"]["init_from"] == str(run_dir / "final") and saved["train"]["steps"] == 1


def test_cli_refuses_mt_bench(tiny_model_dir, tmp_path):
    bench = tmp_path / "mt_bench_question.jsonl"
    bench.write_text(json.dumps({"prompt": "Compose a poem.", "text": "x"}) + "\n")
    result = invoke("distill", "--prompts", bench, "--out", tmp_path / "o.jsonl", "--base-model", tiny_model_dir)
    assert result.exit_code != 0 and "MT-Bench" in result.output
    result = invoke("train", "--base-model", tiny_model_dir, "--data", bench, "--out", tmp_path / "run")
    assert result.exit_code != 0 and "MT-Bench" in result.output
