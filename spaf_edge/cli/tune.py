"""``spaf-edge tune``: search the drafting settings for the best tokens/s here; store them in the export."""

from __future__ import annotations

import click

from spaf_edge.cli import options


def _int_list(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return tuple(int(item) for item in value.split(",") if item.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers, e.g. 1,2,3,4.") from None


def _threshold_list(ctx, param, value: str | None):
    if value is None:
        return None
    items = [item.strip().lower() for item in value.split(",") if item.strip()]
    try:
        return tuple(None if item in ("none", "off") else float(item) for item in items)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers or 'none', e.g. none,0.3,0.5.") from None


@click.command("tune")
@click.argument("export_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@options.prompts_file("the packaged calibration prompts (never MT-Bench, which would contaminate `bench`)")
@options.limit
@click.option("--max-new-tokens", type=int, default=48, show_default=True, help="Greedy tokens per prompt and run.")
@click.option("--screen-prompts", type=int, default=2, show_default=True,
              help="Prompts every candidate runs on before the slower ones are dropped.")
@click.option("--keep", "keep_fraction", type=float, default=0.25, show_default=True,
              help="Share of the candidates that then run on every prompt.")
@click.option("--draft-tokens", callback=_int_list, default=None, metavar="LIST",
              help="num_draft_tokens values to try [1,2,3,4,5,6,7,8].")
@click.option("--transitions", callback=_int_list, default=None, metavar="LIST",
              help="serial_parallel_transition values to try (those <= N; 0: every draft aligned) [0,1,2].")
@click.option("--thresholds", callback=_threshold_list, default=None, metavar="LIST",
              help="Draft-stop thresholds to try, 'none' = off [none,0.3,0.5,0.7].")
@options.chat
@options.provider
@options.threads
@options.progress
@click.option("--store/--no-store", default=True, show_default=True,
              help="Store the result in the export's manifest; --no-store only prints it (read-only exports).")
@click.option("--reset", is_flag=True, help="Remove the stored tuning result instead (run falls back to the config).")
def command(export_dirs, prompts_file, limit, max_new_tokens, screen_prompts, keep_fraction, draft_tokens,
            transitions, thresholds, chat, provider, threads, progress, store, reset):
    """Time drafting settings on calibration prompts with this device and store the fastest in the export.

    Searches num_draft_tokens, serial_parallel_transition and the draft-stop threshold with
    greedy decoding; `spaf-edge run` then uses the result by default. Give the exports of
    several exits (`export --exit-layer`) to compare the exits too.
    """
    from spaf_edge.core.errors import StorageError
    from spaf_edge.runtime.tuning import Grid, TuneOptions, reset_tuned, tune_exports

    if reset:
        for folder in export_dirs:
            removed = reset_tuned(folder)
            click.echo(f"{folder}: {'tuning result removed' if removed else 'no tuning result to remove'}.")
        return
    grid_values = {"num_draft_tokens": draft_tokens, "transitions": transitions, "thresholds": thresholds}
    tune_options = TuneOptions(
        prompts=prompts_file, limit=limit, max_new_tokens=max_new_tokens, screen_prompts=screen_prompts,
        keep_fraction=keep_fraction, chat=chat, provider=provider, threads=threads, progress=progress, store=store,
        grid=Grid(**{name: value for name, value in grid_values.items() if value is not None}),
    )
    results = tune_exports(export_dirs, tune_options)
    for result in results:
        calibration = result.tuned["calibration"]
        click.echo(
            f"{result.folder} (exit {result.exit_layer}) on {result.tuned['provider']} ({result.tuned['device']}): "
            f"{result.screened} settings, {calibration['num_prompts']} prompts x {calibration['max_new_tokens']} "
            "tokens"
        )
        click.echo(result.table())
        click.echo(result.summary())
        if result.mismatches:
            click.echo(f"WARNING: {result.mismatches} runs differ from plain greedy: run `spaf-edge validate`.",
                       err=True)
    best = results[0]
    if len(results) > 1:
        click.echo(f"Fastest exit: {best.exit_layer} ({best.folder}), {best.chosen.tokens_per_second:.1f} tok/s.")
    elif len(best.exits) > 1:
        click.echo(f"The components trained exits {best.exits}; this export uses exit {best.exit_layer}. To compare "
                   "exits, export each with --exit-layer and tune the folders together.")
    unstored = [result for result in results if result.store_error]
    if unstored:  # after the results are printed: the measurements are not lost
        raise StorageError(" ".join(result.store_error for result in unstored))
