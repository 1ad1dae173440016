"""``spaf-edge generate``: the PyTorch reference path."""

from __future__ import annotations

import json
import sys

import click

from spaf_edge.cli import options


@click.command("generate")
@options.base_model
@options.components
@options.cutoff_layer
@options.prompt
@options.max_new_tokens
@options.chat
@options.sampling
@options.drafting
@click.option("--stats/--no-stats", default=True, show_default=True, help="Print tau, acceptance and speed.")
@options.json_output
def command(base_model, components, cutoff_layer, prompt, max_new_tokens, chat, temperature, top_p, top_k, seed,
            num_draft_tokens, serial_parallel_transition, draft_stop_threshold, stats, json_output):
    """Generate with SpAF in PyTorch (the lossless reference)."""
    from spaf_edge.core.config import SpAFConfig
    from spaf_edge.generation.reference import spaf_generate
    from spaf_edge.model import SpAFModel
    from spaf_edge.models.loading import resolve_components
    from spaf_edge.prompts import encode_prompt

    options.check_drafting(num_draft_tokens, serial_parallel_transition)
    components = resolve_components(base_model, components) if cutoff_layer is None else components
    config = None if components else SpAFConfig(cutoff_layer=cutoff_layer)
    model = SpAFModel.from_pretrained(base_model, config, components=components)
    text = prompt if prompt is not None else sys.stdin.read()
    ids = encode_prompt(model.tokenizer, text, chat=chat)
    result = spaf_generate(
        model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        num_draft_tokens=num_draft_tokens, serial_parallel_transition=serial_parallel_transition,
        draft_stop_threshold=draft_stop_threshold,
    )
    output = model.tokenizer.decode(result.tokens, skip_special_tokens=True)
    if json_output:
        click.echo(json.dumps({"tokens": result.tokens, "text": output, "stats": result.stats.to_dict()}))
        return
    click.echo(output)
    if stats:
        click.echo(f"[spaf] {result.stats.summary()}", err=True)
