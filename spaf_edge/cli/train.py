"""``spaf-edge train``: train SpAF adapters and AlignmentHeads on a frozen base.

Runs unchanged in one process or under a launcher (``torchrun``, ``accelerate launch``,
``deepspeed``); see docs/training.md.
"""

from __future__ import annotations

import json

import click

from spaf_edge.cli import options


@click.command("train")
@options.base_model
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Training JSONL (or .jsonl.gz): {'text': ...} or {'messages': [...]} rows (e.g. from `spaf-edge "
                   "distill`). "
                   "Optional with --resume (the saved path is used).")
@click.option("--out", "run_dir", type=click.Path(file_okay=False), required=True,
              help="Run folder: checkpoint/ (latest), final/ (SpAF components), train_log.jsonl.")
@click.option("--config", "config_path", type=click.Path(exists=True), default=None,
              help="spaf_config.json with the SpAF settings (defaults otherwise).")
@click.option("--cutoff-layer", type=int, default=None, help="Cutoff k (default: the config's, else L//2).")
@click.option("--draft-vocab-size", type=int, default=None,
              help="Restrict drafts to the V_d most frequent tokens of the training data.")
@click.option("--rollout-steps", type=int, default=None, help="AlignmentHead steps rolled on its own outputs.")
@click.option("--rollout-decay", type=float, default=None,
              help="Rollout step r's alignment losses weigh decay**(r-1), normalised; in (0, 1] [1.0: plain mean].")
@click.option("--topk-weight", type=float, default=None,
              help="Weight of the top-k ranking loss (loss_weights.topk) on every draft variant [0: off].")
@click.option("--topk-k", type=int, default=None, help="Teacher tokens the top-k ranking loss reads [8].")
@click.option("--steps", type=int, default=None, help="Optimizer steps [300].")
@click.option("--batch-size", type=int, default=None, help="Sequences per micro-step and process [4].")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step [1].")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence [256].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [1e-3].")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay [0].")
@click.option("--warmup", type=int, default=None, help="Linear warmup steps [20].")
@click.option("--min-lr-ratio", type=float, default=None, help="Cosine decay floor as a fraction of --lr [0.1].")
@click.option("--grad-clip", type=float, default=None, help="Max gradient norm, 0 = off [1.0].")
@click.option("--eval-every", type=int, default=None, help="Eval on the held-out split every N steps [50].")
@click.option("--eval-fraction", type=float, default=None, help="Held-out share of the sequences [0.05].")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps [100].")
@click.option("--seed", type=options.SEED, default=None,
              help="Seed of the SpAF initial weights, the data split and order [0].")
@click.option("--logit-chunk-rows", type=int, default=None, help="Positions whose vocabulary logits are held at once [512].")
@click.option("--max-examples", type=int, default=None, help="Use only the first N rows of --data.")
@click.option("--time-budget", type=float, default=None,
              help="Seconds of training steps: the step time is measured over steps 5-25 and --steps is cut "
                   "to what fits (the cosine schedule follows), then re-checked at steps 50, 100, ... until half "
                   "the run. Default: no limit.")
@click.option("--stop-after", type=float, default=None,
              help="Seconds after the first step: write a checkpoint and stop, keeping the schedule of --steps, "
                   "so a later --resume (on any machine) continues it. For one call; not saved. Default: no limit.")
@click.option("--packing/--no-packing", default=None, help="Pack rows into full sequences [packing].")
@click.option("--compact-state/--exact-state", default=None,
              help="Checkpoints keep the optimizer moments in bfloat16 (the components, step, schedule, RNG and "
                   "data position stay exact): a state small enough to commit; may change on --resume [exact].")
@click.option("--feature-cache", type=click.Path(file_okay=False), default=None,
              help="Cache the frozen base's features (fp16) here and reuse them every epoch.")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default=None,
              help="GPU mixed precision (fp32 SpAF master weights). Default: the DeepSpeed config's, "
                   "accelerate launch's, else no.")
@click.option("--base-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Frozen base dtype; auto = the mixed precision's on GPU, float32 on CPU.")
@click.option("--deepspeed", "deepspeed_config", default=None,
              help="DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); 'auto' values come from these options.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--init-from", type=click.Path(file_okay=False, exists=True), default=None,
              help="Start from these trained components (config, weights, draft vocabulary) with a fresh "
                   "optimizer and schedule, e.g. to fine-tune them on new data.")
@options.progress
def command(base_model, data, run_dir, config_path, cutoff_layer, draft_vocab_size, rollout_steps, rollout_decay,
            topk_weight, topk_k, mixed_precision, base_dtype, deepspeed_config, resume, init_from, progress,
            **settings):
    """Train SpAF components (only they train; the base stays frozen)."""
    from spaf_edge.core.config import SpAFConfig
    from spaf_edge.training.distributed import DistributedSettings, end_process_group
    from spaf_edge.training.trainer import check_run_start, train_run

    overrides = {name: value for name, value in settings.items() if value is not None}
    spaf_options = {"--config": config_path, "--cutoff-layer": cutoff_layer, "--draft-vocab-size": draft_vocab_size}
    recipe = {"rollout_steps": rollout_steps, "rollout_decay": rollout_decay, "topk_weight": topk_weight,
              "topk_k": topk_k}
    check_run_start(resume, init_from, [name for name, value in spaf_options.items() if value is not None],
                    ["--" + name.replace("_", "-") for name, value in recipe.items() if value is not None])
    config = None
    if init_from:  # the components' config with the recipe given, if any (train_run checks nothing else moved)
        if any(value is not None for value in recipe.values()):
            config = SpAFConfig.load(init_from).with_recipe(**recipe)
    elif not resume:
        config = SpAFConfig.load(config_path) if config_path else SpAFConfig()
        changes = {"cutoff_layer": cutoff_layer, "draft_vocab_size": draft_vocab_size}
        config = config.replace(**{k: v for k, v in changes.items() if v is not None}).with_recipe(**recipe)
    distributed = DistributedSettings(mixed_precision, base_dtype, deepspeed_config)
    try:
        result = train_run(base_model, data, run_dir, overrides, config, resume=resume, progress=progress,
                           distributed=distributed, init_from=init_from)
    finally:
        end_process_group()
    if not result.main_process:
        return
    click.echo(json.dumps({
        "final": str(result.final), "steps": result.steps, "train_losses": result.train_losses,
        "eval_losses": result.eval_losses, "tokens_per_second": round(result.tokens_per_second, 1),
        "seconds": round(result.seconds, 1), "replica_max_diff": result.replica_max_diff,
    }, indent=2))

