"""``spaf-edge distill``: self-distillation data from the base model's own replies."""

from __future__ import annotations

import json

import click

from spaf_edge.cli import options


@click.command("distill")
@click.option("--prompts", type=click.Path(dir_okay=False), required=True,
              help="Prompt JSONL (or .jsonl.gz), one {'prompt': ..., 'source': ..., 'license': ...} per line (never "
                   "MT-Bench).")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Output chat JSONL for `spaf-edge train`; appended to and resumed if it exists.")
@options.base_model
@click.option("--max-new-tokens", type=options.NEW_TOKENS, default=256, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "onnx", "torch"]), default="auto", show_default=True,
              help="onnx: the ONNX Runtime engine's lossless SpAF decoding of an fp32 export (exported once, "
                   "cached), one prompt at a time; its greedy replies are the base's, token for token. torch: "
                   "--batch-size prompts decoded together (on a CPU a finished row takes the next prompt at "
                   "once): the one for a GPU, and the faster one on a 2-core AVX2 CPU (docs/training.md). "
                   "auto: torch when --device is CUDA or (auto) torch sees a GPU, else onnx.")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Prompts generated together (torch backend; onnx generates one at a time). On a CPU, 16 "
                   "made about half the tokens per second of 64.")
@click.option("--limit", type=int, default=None, help="Use only N prompts (the first N, or random with --shuffle).")
@click.option("--shuffle", is_flag=True, help="Pick --limit prompts at random (seeded) instead of the first ones.")
@click.option("--seed", type=options.SEED, default=0, show_default=True, help="Seed of --shuffle and of sampling.")
@options.temperature
@options.top_p
@click.option("--max-prompt-tokens", type=int, default=1024, show_default=True,
              help="Skip prompts longer than this (in chat-template tokens).")
@click.option("--device", default="auto", show_default=True,
              help="torch device of the generation: auto (cuda when available, else cpu), cpu, cuda, cuda:N. "
                   "The onnx backend runs on the CPU.")
@options.components
@click.option("--export", type=click.Path(exists=True, file_okay=False), default=None,
              help="onnx backend: an existing export folder of --base-model (from `spaf-edge export`) instead of "
                   "exporting the base + --components to the cache.")
@options.threads
@click.option("--shard", default=None, metavar="K/N",
              help="Generate only shard K of N (the prompts whose line index is K modulo N), so that N processes "
                   "or machines split the prompts; give each shard its own --out.")
@click.option("--second-turns", is_flag=True,
              help="--prompts is a first-turn output of distill (.jsonl or .jsonl.gz): each complete reply gets a "
                   "follow-up request (one of a built-in set, chosen by --seed and the row) and the base's reply "
                   "to the conversation. Use another --out than the first turns'.")
@options.progress
def command(prompts, out, base_model, backend, max_new_tokens, batch_size, limit, shuffle, seed, temperature, top_p,
            max_prompt_tokens, device, components, export, threads, shard, second_turns, progress):
    """Generate the base model's replies to training prompts (resumable).

    Greedy by default; --temperature T samples, seeded per prompt (per batch with torch)
    from --seed, so a resumed run writes what an uninterrupted one would.
    """
    from spaf_edge.core.config import validate_sampling
    from spaf_edge.training.distill import distill, parse_shard

    validate_sampling(temperature, top_p, 0)
    shard = parse_shard(shard)
    summary = distill(
        prompts, out, base_model, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, seed=seed,
        temperature=temperature, top_p=top_p, shuffle=shuffle, max_prompt_tokens=max_prompt_tokens,
        device=device, progress=progress, backend=backend, components=components, export=export, threads=threads,
        shard=shard, second_turns=second_turns,
    )
    click.echo(json.dumps({
        "out": str(summary.out), "written": summary.written, "already_done": summary.already_done,
        "skipped_long": summary.skipped_long, "new_tokens": summary.new_tokens,
        "seconds": round(summary.seconds, 1), "tokens_per_second": round(summary.tokens_per_second, 1),
        "backend": summary.backend, "device": summary.device,
    }, indent=2))
