"""Click options shared by several commands (defined once)."""

from __future__ import annotations

import click

base_model = click.option(
    "--base-model", default="default", show_default=True,
    help="Base model: a local HF folder, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct).",
)
components = click.option(
    "--components", type=click.Path(file_okay=False), default=None,
    help="SpAF checkpoint folder (from `spaf-edge train`); untrained modules when omitted.",
)
prompt = click.option("--prompt", default=None, help="Prompt text; read from stdin when omitted.")
max_new_tokens = click.option("--max-new-tokens", type=int, default=128, show_default=True)
chat = click.option(
    "--chat/--raw", default=True, show_default=True,
    help="Wrap the prompt in the model's chat template (when it has one).",
)


def sampling(func):
    """--temperature/--top-p/--top-k/--seed."""
    for option in reversed([
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--seed", type=int, default=None),
    ]):
        func = option(func)
    return func


def drafting(func):
    """--num-draft-tokens/--serial-parallel-transition/--draft-stop-threshold (default: config's)."""
    for option in reversed([
        click.option("--num-draft-tokens", "-N", type=int, default=None, help="Drafts per verify step."),
        click.option("--serial-parallel-transition", "-s", type=int, default=None,
                     help="Drafts made through the lower stack before the AlignmentHead takes over."),
        click.option("--draft-stop-threshold", type=float, default=None,
                     help="Stop drafting when the draft's top probability falls below this."),
    ]):
        func = option(func)
    return func
