"""``spaf-edge run``: stream text from an export folder with the onnxruntime engine (no torch)."""

from __future__ import annotations

import json
import sys

import click

from spaf_edge.cli import options


@click.command("run")
@click.argument("export_dir", type=click.Path(file_okay=False))
@options.prompt
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the prompt from standard input.")
@click.option("--chat-loop", type=click.Choice(["interactive"]), default=None,
              help="Multi-turn chat: one user turn per line of standard input, until an empty line or EOF.")
@options.max_new_tokens
@options.chat
@options.special_tokens
@options.sampling
@options.drafting
@options.tree
@click.option("--mode", type=click.Choice(["spaf", "greedy"]), default="spaf", show_default=True,
              help="spaf: speculative decoding; greedy: plain decoding, one token per pass (the baseline).")
@options.provider
@options.threads
@click.option("--stats", is_flag=True, help="Print tau, acceptance and speed to stderr after each answer.")
@options.json_output
def command(export_dir, prompt, from_stdin, chat_loop, max_new_tokens, chat, special_tokens, temperature, top_p,
            top_k, seed, num_draft_tokens, serial_parallel_transition, draft_stop_threshold, proposers, tree_width,
            lookup_branches, lookup_depth, lookup_start, lookup_min_match, max_nodes, mode, provider, threads, stats,
            json_output):
    """Generate from an export folder (from `spaf-edge export`) with ONNX Runtime, streaming the text."""
    from spaf_edge.runtime.engine import Engine

    if prompt is not None and from_stdin:
        raise click.UsageError("Give either --prompt or --stdin, not both.")
    if chat_loop and (prompt is not None or from_stdin):
        raise click.UsageError("--chat-loop reads every turn from standard input; drop --prompt and --stdin.")
    options.check_drafting(num_draft_tokens, serial_parallel_transition)
    text = None
    if not chat_loop:
        text = prompt_text(prompt) if prompt is not None else decode_input(read_stdin_bytes(), "standard input")

    engine = Engine.from_folder(export_dir, provider=provider, threads=threads)
    warn_if_tuned_elsewhere(engine.manifest.tuned, engine.provider.name, threads, engine.thread_pool)
    if stats:
        click.echo(f"[spaf-edge run] {engine.rows.describe()}", err=True)
    settings = dict(
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, num_draft_tokens=num_draft_tokens,
        serial_parallel_transition=serial_parallel_transition, draft_stop_threshold=draft_stop_threshold, mode=mode,
        proposers=proposers, tree_width=tree_width, lookup_branches=lookup_branches, lookup_depth=lookup_depth,
        lookup_start=lookup_start, lookup_min_match=lookup_min_match, max_nodes=max_nodes,
    )
    if stats:  # what the export's defaults, a tuned entry and the options above resolve to
        decoding = engine.settings(**{key: value for key, value in settings.items() if key != "seed"})
        click.echo(f"[spaf-edge run] decoding: {decoding.describe()}", err=True)
    if chat_loop:
        chat_session(engine, max_new_tokens, settings, stats, special_tokens)
        return
    if json_output:
        result = engine.generate(text, max_new_tokens=max_new_tokens, chat=chat, special_tokens=special_tokens,
                                 **settings)
        click.echo(json.dumps({"tokens": result.tokens, "text": result.text, "stop_reason": result.stop_reason,
                               "lossless": engine.lossless, "stats": result.stats.to_dict()}))
        return
    answer(engine, text, max_new_tokens, dict(settings, chat=chat, special_tokens=special_tokens), stats)


def decode_input(data: bytes, source: str) -> str:
    """UTF-8 bytes -> text; invalid bytes become U+FFFD, with a one-line warning."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        click.echo(f"[spaf-edge run] warning: {source} is not valid UTF-8; its invalid bytes were replaced by "
                   "U+FFFD.", err=True)
        return text


def prompt_text(prompt: str) -> str:
    """--prompt as text: argv bytes that were not UTF-8 arrive as lone surrogates (surrogateescape)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        try:
            data = prompt.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # surrogates that no argv byte gives
            data = prompt.encode("utf-8", "surrogatepass")
        return decode_input(data, "--prompt")
    return prompt


def read_stdin_bytes(line: bool = False) -> bytes:
    """All of standard input (or one line of it) as bytes, so that its decoding is ours."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text-only stream (embedding code): its text is re-encoded as it came
        data = sys.stdin.readline() if line else sys.stdin.read()
        return data.encode("utf-8", "surrogatepass")
    return stream.readline() if line else stream.read()


def warn_if_tuned_elsewhere(tuned: dict | None, provider: str, threads: int | None, thread_pool: str,
                            device: str | None = None) -> None:
    """The stored tuning is a measurement of one device, provider and thread setting: say when this run differs.

    ``device``: this machine as :func:`~spaf_edge.runtime.tuning.describe_device` names it; None: found here.
    """
    if not tuned:
        return
    if device is None and "device" in tuned:
        from spaf_edge.runtime.tuning import describe_device

        device = describe_device(provider)
    now = (("device", device), ("provider", provider), ("threads", threads), ("thread_pool", thread_pool))
    differences = [f"{name} {tuned.get(name)!r} (now {value!r})" for name, value in now
                   if name in tuned and tuned[name] != value]
    if differences:
        click.echo(f"[spaf-edge run] note: the stored tuning was measured with {', '.join(differences)}; "
                   "re-run `spaf-edge tune` for this setup.", err=True)


def answer(engine, prompt, max_new_tokens: int, settings: dict, stats: bool) -> str:
    """Stream one answer to stdout; return its text."""
    stream = engine.stream(prompt, max_new_tokens=max_new_tokens, **settings)
    for piece in stream:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if stats:
        click.echo(f"[spaf-edge run] {stream.result.stats.summary()}, stop: {stream.result.stop_reason}", err=True)
    return stream.result.text


def chat_session(engine, max_new_tokens: int, settings: dict, stats: bool, special_tokens: bool = False) -> None:
    """Read user turns from stdin; the KV rows of the conversation so far are reused each turn."""
    from spaf_edge.core.errors import ConfigError

    if engine.tokenizer is None or not engine.tokenizer.has_chat_template:
        raise ConfigError("--chat-loop needs a model with a chat template; use --prompt with --raw instead.")
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = []
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = decode_input(read_stdin_bytes(line=True), "the input line")
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = engine.tokenizer.encode_chat(messages, special_tokens=special_tokens)
        reply = answer(engine, ids, max_new_tokens, dict(settings, reuse_cache=True), stats)
        messages.append({"role": "assistant", "content": reply})
