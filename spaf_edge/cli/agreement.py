"""``spaf-edge agreement``: drafter top-1 agreement with the base (and τ) on evaluation prompts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from spaf_edge.cli import options


@click.command("agreement")
@options.base_model
@options.components
@options.prompts_file("the packaged MT-Bench first turns")
@options.limit
@click.option("--max-new-tokens", type=options.NEW_TOKENS, default=128, show_default=True,
              help="Length of the reference replies.")
@click.option("--aligned-steps", type=int, default=3, show_default=True, help="Aligned draft steps to score.")
@click.option("--tau-prompts", type=int, default=8, show_default=True,
              help="Also run SpAF greedy generation on this many prompts and report τ (0: skip).")
@options.drafting
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON here.")
@options.progress
def command(base_model, components, prompts_file, limit, max_new_tokens, aligned_steps, tau_prompts, num_draft_tokens,
            serial_parallel_transition, draft_stop_threshold, out, progress):
    """Score the drafters against the base model's own greedy replies (teacher-forced).

    Agreement is the share of reply positions where a draft equals the base's greedy
    token: the first draft (adapter on exact states) and aligned drafts 1..R steps
    into an AlignmentHead chain. τ is measured with the PyTorch reference decoder.
    """
    from spaf_edge.core.errors import ConfigError
    from spaf_edge.core.prompt_sets import encode_prompts, load_prompts
    from spaf_edge.model import SpAFModel
    from spaf_edge.models.loading import cache_dir, resolve_components
    from spaf_edge.prompts import encode_prompt
    from spaf_edge.training.agreement import measure_agreement, reference_replies

    if aligned_steps < 0 or tau_prompts < 0 or max_new_tokens < 1:
        raise ConfigError("--aligned-steps and --tau-prompts must be >= 0 and --max-new-tokens >= 1.")
    components = resolve_components(base_model, components)
    model = SpAFModel.from_pretrained(base_model, components=components)
    chosen = load_prompts(prompts_file, limit=limit)
    encoded = encode_prompts(chosen, lambda text: encode_prompt(model.tokenizer, text))
    pairs = [(prompt.category, ids) for prompt, ids in zip(chosen, encoded)]
    replies = reference_replies(model, pairs, max_new_tokens, cache=cache_dir() / "agreement", progress=progress)
    report = {"components": components, "prompts": prompts_file or "MT-Bench (packaged)", "num_prompts": len(pairs),
              "max_new_tokens": max_new_tokens, "exits": []}
    for exit_layer in model.config.adapter_layers:  # every trained exit, each as the cutoff
        model.config = model.config.replace(cutoff_layer=exit_layer)
        entry = measure_agreement(model, replies, aligned_steps, exit_layer).to_dict()
        entry["percent_of_base_parameters"] = round(100 * exit_parameters(model, exit_layer)
                                                    / model.num_base_parameters(), 3)
        if tau_prompts:
            entry.update(measure_tau(model, encoded[:tau_prompts], max_new_tokens, num_draft_tokens,
                                     serial_parallel_transition, draft_stop_threshold))
        report["exits"].append(entry)
    text = json.dumps(report, indent=2)
    if out:
        from spaf_edge.core.atomic import atomic_write_text

        atomic_write_text(Path(out), text + "\n")
    click.echo(text)


def exit_parameters(model, exit_layer: int) -> int:
    """SpAF parameters one exit uses (its adapter and AlignmentHead): what an export of it carries."""
    modules = [model.adapters[str(exit_layer)], model.alignment_heads[str(exit_layer)]]
    return sum(p.numel() for module in modules for p in module.parameters())


def measure_tau(model, prompts, max_new_tokens, num_draft_tokens, transition, stop_threshold) -> dict:
    """τ of the PyTorch reference decoder (greedy) over ``prompts`` (token id lists)."""
    from spaf_edge.generation.reference import spaf_generate

    new_tokens = steps = 0
    for ids in prompts:
        result = spaf_generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                               num_draft_tokens=num_draft_tokens, serial_parallel_transition=transition,
                               draft_stop_threshold=stop_threshold)
        new_tokens += result.stats.new_tokens
        steps += result.stats.verify_steps
    return {"tau": round(new_tokens / max(steps, 1), 3), "tau_prompts": len(prompts)}
