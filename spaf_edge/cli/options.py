"""Click options shared by several commands, each defined once (same name, default and help everywhere)."""

from __future__ import annotations

import click

base_model = click.option(
    "--base-model", default="default", show_default=True,
    help="Base model: a local HF folder, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct).",
)
components = click.option(
    "--components", type=click.Path(file_okay=False), default=None,
    help="SpAF checkpoint folder (from `spaf-edge train`). Default: the trained components shipped for the "
         "embedded default model, untrained modules for other bases; 'none' forces untrained modules.",
)
cutoff_layer = click.option(
    "--cutoff-layer", type=int, default=None, help="Cutoff k for untrained components (default L//2)."
)
limit = click.option("--limit", type=int, default=None, help="Use only the first N prompts.")
prompt = click.option("--prompt", default=None, help="Prompt text; read from stdin when omitted.")
max_new_tokens = click.option("--max-new-tokens", type=int, default=128, show_default=True)
chat = click.option(
    "--chat/--raw", default=True, show_default=True,
    help="Wrap the prompt in the model's chat template (when it has one).",
)
json_output = click.option(
    "--json-output", is_flag=True, help="Print one JSON object (tokens, text, stats) instead of text."
)
progress = click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")

# ---- runtime ----------------------------------------------------------------
provider = click.option(
    "--provider", default="cpu", show_default=True,
    help="onnxruntime execution provider: cpu, cuda, tensorrt, dml, coreml or qnn.",
)
threads = click.option(
    "--threads", type=click.IntRange(min=1), default=None,
    help="Intra-op threads (default: the library's choice, normally every usable core).",
)
precision = click.option(
    "--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
    help="Weights, KV caches and hidden states (logits are always fp32). fp16 targets GPU providers.",
)


def prompts_file(default: str):
    """--prompts FILE (dest ``prompts_file``); ``default`` says what is used without it."""
    return click.option(
        "--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
        help=f"JSONL prompts, a 'prompt' string or MT-Bench 'turns' list per line; default: {default}.",
    )


# ---- sampling and drafting ----------------------------------------------------
temperature = click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
top_p = click.option("--top-p", type=float, default=1.0, show_default=True)
top_k = click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
seed = click.option("--seed", type=int, default=None)


def sampling(func):
    """--temperature/--top-p/--top-k/--seed."""
    for option in reversed([temperature, top_p, top_k, seed]):
        func = option(func)
    return func


def drafting(func):
    """--num-draft-tokens/--serial-parallel-transition/--draft-stop-threshold.

    Unset, they come from the export's `spaf-edge tune` result, else the SpAF config.
    """
    for option in reversed([
        click.option("--num-draft-tokens", "-N", type=int, default=None, help="Drafts per verify step."),
        click.option("--serial-parallel-transition", "-s", type=int, default=None,
                     help="Drafts made through the lower stack before the AlignmentHead takes over "
                          "(0: every draft aligned, the backbone runs in the verify pass only)."),
        click.option("--draft-stop-threshold", type=float, default=None,
                     help="Stop drafting when the draft's top probability falls below this."),
    ]):
        func = option(func)
    return func
