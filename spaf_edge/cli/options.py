"""Click options shared by several commands, each defined once (same name, default and help everywhere)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click


class Checked(click.ParamType):
    """An int or float option refused, before anything loads, with the library's message for the
    setting (``Invalid top_p=0.0: expected ...``, as :mod:`spaf_edge.core.config` words it)."""

    def __init__(self, base: click.ParamType, setting: str, ok: Callable[[Any], bool], expected: str) -> None:
        self.base, self.setting, self.ok, self.expected = base, setting, ok, expected
        self.name = base.name

    def convert(self, value, param, ctx):
        number = self.base.convert(value, param, ctx)
        if not self.ok(number):  # nan fails every comparison, so every range refuses it
            self.fail(f"Invalid {self.setting}={number!r}: expected {self.expected}.", param, ctx)
        return number


NEW_TOKENS = Checked(click.INT, "max_new_tokens", lambda n: n >= 1, "an integer >= 1")
SEED = Checked(click.INT, "seed", lambda n: n >= 0, "an integer >= 0")  # numpy's generators refuse negatives


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
max_new_tokens = click.option("--max-new-tokens", type=NEW_TOKENS, default=128, show_default=True)
chat = click.option(
    "--chat/--raw", default=True, show_default=True,
    help="Wrap the prompt in the model's chat template (when it has one).",
)
special_tokens = click.option(
    "--raw-special-tokens", "special_tokens", is_flag=True,
    help="Let special-token strings in the prompt (e.g. <|im_end|>) act as control tokens. By default they "
         "are plain text, so a prompt cannot end its turn or inject another.",
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


def _cap_threads(ctx, param, value: int | None) -> int | None:
    """More threads than usable cores only makes them wait on each other (300x slower seen): cap, and say so."""
    if value is None:
        return None
    from spaf_edge.runtime.session import default_threads

    cores = default_threads()
    if value > cores:
        click.echo(f"[spaf-edge] warning: --threads {value} is more than the {cores} usable cores; "
                   f"using {cores}.", err=True)
        return cores
    return value


threads = click.option(
    "--threads", type=click.IntRange(min=1), default=None, callback=_cap_threads,
    help="Intra-op threads, at most the usable cores (default: the library's choice, normally every usable core).",
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
temperature = click.option(
    "--temperature", type=Checked(click.FLOAT, "temperature", lambda t: 0 <= t < math.inf,
                                  "a finite number >= 0 (0 = greedy)"),
    default=0.0, show_default=True, help="0 = greedy.",
)
top_p = click.option(
    "--top-p", type=Checked(click.FLOAT, "top_p", lambda p: 0 < p <= 1, "a number in (0, 1]"), default=1.0,
    show_default=True,
)
top_k = click.option(
    "--top-k", type=Checked(click.INT, "top_k", lambda k: k >= 0, "an integer >= 0 (0 = off)"), default=0,
    show_default=True, help="0 = off.",
)
seed = click.option("--seed", type=SEED, default=None)


def sampling(func):
    """--temperature/--top-p/--top-k/--seed."""
    for option in reversed([temperature, top_p, top_k, seed]):
        func = option(func)
    return func


def check_drafting(num_draft_tokens: int | None, serial_parallel_transition: int | None) -> None:
    """The one drafting rule the option types cannot check alone, before any model loads."""
    if None not in (num_draft_tokens, serial_parallel_transition) and serial_parallel_transition > num_draft_tokens:
        raise click.BadParameter(
            f"Invalid serial_parallel_transition={serial_parallel_transition}: expected an integer with "
            f"0 <= serial_parallel_transition <= num_draft_tokens ({num_draft_tokens}).",
            param_hint="'--serial-parallel-transition'",
        )


def drafting(func):
    """--num-draft-tokens/--serial-parallel-transition/--draft-stop-threshold.

    Unset, they come from the export's `spaf-edge tune` result, else the SpAF config.
    """
    for option in reversed([
        click.option("--num-draft-tokens", "-N", type=Checked(click.INT, "num_draft_tokens", lambda n: n >= 1,
                                                                "an integer >= 1"),
                     default=None, help="Drafts per verify step."),
        click.option("--serial-parallel-transition", "-s",
                     type=Checked(click.INT, "serial_parallel_transition", lambda s: s >= 0, "an integer >= 0"),
                     default=None,
                     help="Drafts made through the lower stack before the AlignmentHead takes over "
                          "(0: every draft aligned, the backbone runs in the verify pass only)."),
        click.option("--draft-stop-threshold", default=None,
                     type=Checked(click.FLOAT, "draft_stop_threshold", lambda t: 0 <= t < 1, "a number in [0, 1)"),
                     help="Stop drafting when the draft's top probability falls below this."),
    ]):
        func = option(func)
    return func


def tree(func):
    """--proposers/--tree-width/--lookup-branches/--lookup-depth/--lookup-start/--lookup-min-match/--max-nodes:
    who drafts and the draft tree's shape.

    Unset, they come from the export's `spaf-edge tune` result, else the defaults (SpAF chains).
    """
    for option in reversed([
        click.option("--proposers", default=None,
                     type=Checked(click.STRING, "proposers", _valid_proposers, "spaf, lookup or spaf+lookup"),
                     help="Who drafts: spaf (the trained drafter), lookup (copies from the prompt and the "
                          "answer so far, no model call) or spaf+lookup (the default: one tree where this device "
                          "verifies trees exactly, else per step a long enough lookup match or SpAF's chain)."),
        click.option("--tree-width", default=None,
                     type=Checked(click.INT, "tree_width", lambda n: n >= 1, "an integer >= 1"),
                     help="SpAF candidates per depth: its draft plus runner-up leaves (1: a chain)."),
        click.option("--lookup-branches", default=None,
                     type=Checked(click.INT, "lookup_branches", lambda n: n >= 1, "an integer >= 1"),
                     help="Lookup continuations merged into the tree."),
        click.option("--lookup-depth", default=None,
                     type=Checked(click.INT, "lookup_depth", lambda n: n >= 1, "an integer >= 1"),
                     help="Tokens a lookup branch copies at most."),
        click.option("--lookup-start", default=None,
                     type=Checked(click.INT, "lookup_start", lambda n: n >= 1, "an integer >= 1"),
                     help="Tokens a lookup branch copies after a step that did not accept a whole lookup chain; "
                          "each step that did doubles it, up to --lookup-depth."),
        click.option("--lookup-min-match", default=None,
                     type=Checked(click.INT, "lookup_min_match", lambda n: n >= 1, "an integer >= 1"),
                     help="Chains: a lookup branch is the step's chain when its match has this many tokens."),
        click.option("--max-nodes", default=None,
                     type=Checked(click.INT, "max_nodes", lambda n: n >= 1, "an integer >= 1"),
                     help="Candidates a draft tree may hold (the verify pass's rows, less one)."),
    ]):
        func = option(func)
    return func


def _valid_proposers(value: str) -> bool:
    from spaf_edge.core.errors import ConfigError
    from spaf_edge.decoding.loop import parse_proposers

    try:
        parse_proposers(value)
    except ConfigError:
        return False
    return True
