"""Self-distillation data: the base model's own replies to training prompts (DESIGN §3).

Reads a prompt JSONL (``{"prompt": ..., "source": ..., "license": ...}`` per line),
generates replies (greedy unless a temperature is given) and appends chat rows that
``spaf-edge train`` reads:

``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "prompt_index": i,
"finish_reason": "eos" | "length", "distilled_with": {...}, "source": ..., "license": ...}``

``source``/``license`` (and any other fields of the prompt row) are carried over for
attribution; ``distilled_with`` names the backend (and the export or torch device) that
wrote the row; sampled rows add ``"sampling": {"temperature", "top_p", "seed"}`` (greedy rows have
no such field, and a file keeps one rule: a resume with another is refused); ``spaf-edge train``
reads only ``messages``. The output is resumable: each row is appended as a whole line when
its reply ends and fsynced within a second (and after each group); on
restart a partial last line is cut off and prompts whose ``prompt_index`` is already
written are skipped. Prompts are processed in order of token length, so the written order
differs from the prompt file's. With ``second_turns`` the prompts are first-turn rows of an
earlier call, each followed up by a request (:mod:`spaf_edge.training.second_turns`): rows of
four messages with ``"turn": 2``. ``--out`` is plain JSONL (lines are appended); the readers
(``--prompts``, ``train --data``) also take ``.jsonl.gz``.

Two backends generate, from the same prompt ids (:func:`spaf_edge.prompts.encode_prompt`
with the base's tokenizer):

- ``onnx``: the project's ONNX Runtime engine, one prompt at a time, by SpAF decoding of an
  fp32 export of the base + SpAF components (exported once into the cache). Lossless: its
  greedy replies are the base's greedy replies, and sampling follows the exact
  speculative-sampling rule, so replies are drawn from the base's distribution (not the
  same draws as torch's for a seed). Faster than batched ``generate`` at batch 8 on an AVX-512
  CPU, slower than it at batch 64 on an AVX2 one (docs/training.md).
- ``torch``: ``--batch-size`` prompts decoded together. On a CPU a row whose reply ends takes
  the next prompt at once (:mod:`spaf_edge.training.refill`), so no slot idles until its batch's
  longest reply ends; on a GPU transformers ``generate`` runs batch after batch with left padding.
  Batched greedy decoding may differ from unbatched decoding by float rounding after a near-tie;
  for training data that does not matter. The choice for a GPU, and on a 2-core AVX2 CPU.

``auto`` picks ``torch`` when CUDA is chosen or available (or a torch model is passed in),
``onnx`` otherwise. Sampling is seeded per prompt (``seed * 1_000_003`` plus the prompt's
index; per batch, from its first prompt, for ``generate`` on a GPU), so a resumed run draws
what an uninterrupted one would (for ``generate``, with the same batch size).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spaf_edge.core.errors import ConfigError, UnsupportedArchitectureError
from spaf_edge.core.jsonl import read_jsonl
from spaf_edge.core.progress import advance, progress_bar
from spaf_edge.prompts import encode_conversation, encode_prompt
from spaf_edge.training.data import is_evaluation_row, refuse_evaluation_data

log = logging.getLogger(__name__)


@dataclass
class PromptRow:
    index: int  # 0-based position among the prompt file's rows (second turns: the first turn's prompt_index)
    prompt: str  # the user turn to reply to
    extra: dict[str, Any]  # other fields (source, license, ...), kept in the output
    history: list[dict[str, str]] = field(default_factory=list)  # earlier turns (second turns: prompt, reply)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [*self.history, {"role": "user", "content": self.prompt}]

    def encode(self, tokenizer: Any) -> list[int]:
        """The ids the reply follows: the chat template over the turns."""
        if self.history:
            return encode_conversation(tokenizer, self.messages)
        return encode_prompt(tokenizer, self.prompt)


@dataclass
class DistillSummary:
    out: Path
    written: int  # rows written by this call
    already_done: int  # rows found from an earlier call
    skipped_long: int  # prompts longer than max_prompt_tokens
    new_tokens: int
    seconds: float
    device: str = "cpu"
    backend: str = "torch"

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def read_prompts(path: str | os.PathLike) -> list[PromptRow]:
    """The file's prompts, less those quoting a grounded evaluation prompt's passage.

    A row's ``index`` is its place among all the file's rows, skipped ones included, so
    the ``prompt_index`` of written replies does not depend on the evaluation set.
    """
    refuse_evaluation_data(path)
    rows = []
    skipped = 0
    for index, (number, row) in enumerate(read_jsonl(path)):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{path}:{number} has no 'prompt' string. Each line must be {{\"prompt\": ...}}.")
        if is_evaluation_row(row):
            skipped += 1
            continue
        extra = {key: value for key, value in row.items() if key != "prompt"}
        rows.append(PromptRow(index, prompt, extra))
    if skipped:
        log.info("Skipped %d prompts of %s that quote grounded evaluation prompts.", skipped, path)
    if not rows:
        raise ConfigError(f"{path} has no prompts" + (f" besides {skipped} evaluation ones." if skipped else "."))
    return rows


def select_prompts(rows: list[PromptRow], limit: int | None, shuffle: bool, seed: int) -> list[PromptRow]:
    """The first ``limit`` prompts, or a seeded random ``limit`` of them with ``shuffle``."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: expected an integer >= 1.")
    if shuffle:
        rows = random.Random(seed).sample(rows, len(rows))
    return rows[:limit] if limit is not None else rows


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``; None stays None. ConfigError names the form otherwise."""
    if value is None:
        return None
    parts = value.split("/")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        index, count = (int(part) for part in parts)
        if count >= 1 and index < count:
            return index, count
    raise ConfigError(f"--shard {value!r}: expected K/N with 0 <= K < N, e.g. 0/2 and 1/2 for two processes.")


def shard_prompts(rows: list[PromptRow], shard: tuple[int, int] | None) -> list[PromptRow]:
    """The prompts of shard ``K/N``: those whose index in the prompt file is ``K`` modulo ``N`` (all for None).

    By file index, not by position among the selected prompts: a prompt stays in its shard whatever
    --limit or --shuffle select, so shards resumed with other settings never overlap.
    """
    if shard is None:
        return rows
    index, count = shard
    return [row for row in rows if row.index % count == index]


def sampling_record(temperature: float, top_p: float, seed: int) -> dict[str, float] | None:
    """What a sampled row records of how it was drawn (``"sampling"``); None for greedy rows, which carry no
    such field (the rows of older runs are all greedy)."""
    if temperature <= 0:
        return None
    return {"temperature": temperature, "top_p": top_p, "seed": seed}


def repair_and_read_done(out: Path, sampling: dict[str, float] | None = None) -> set[int]:
    """Cut a partial last line off ``out`` and return the prompt indices it holds.

    A row drawn under another sampling rule than ``sampling`` (:func:`sampling_record`; greedy rows have
    none) is refused: a resumed run would mix greedy and sampled replies, or two temperatures, in one file.
    """
    if not out.is_file():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as handle:
            handle.truncate(end)
    done = set()
    # Split on "\n" only: replies may hold U+2028 and kin, which str.splitlines() would also split on.
    for number, line in enumerate(data[:end].decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add(int(row["prompt_index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{out}:{number} is not a row written by `spaf-edge distill` ({exc}). "
                "Pass a new --out file, or remove the foreign lines."
            ) from exc
        if row.get("sampling") != sampling:
            raise ConfigError(
                f"{out}:{number} was {describe_sampling(row.get('sampling'))}, and this run asks for "
                f"{describe_sampling(sampling)}. Keep one sampling rule per file: pass another --out, or the "
                "file's own --temperature/--top-p/--seed to continue it."
            )
    return done


def describe_sampling(record: dict[str, float] | None) -> str:
    if record is None:
        return "greedy"
    return f"sampled at temperature {record['temperature']}, top-p {record['top_p']}, seed {record['seed']}"


BACKENDS = ("auto", "onnx", "torch")
SYNC_SECONDS = 1.0  # rows are flushed as they end and fsynced at least this often and after each group
EXPORT_LENGTH_STEP = 1024  # onnx exports hold a multiple of this many KV rows, so settings share exports


@dataclass
class ReplyBackend:
    """Generates the replies of a group of prompts: ``generate([(row, prompt_ids), ...])`` yields
    ``(position in the group, reply tokens, finish reason)`` for each, in the order they end."""

    name: str  # "onnx" | "torch"
    tokenizer: Any  # the base's transformers tokenizer: encodes prompts, decodes replies
    group: int  # prompts handed to one generate call (rows are written as each reply ends)
    device: str
    label: dict[str, str]  # written into each row as "distilled_with"
    generate: Callable[[list[tuple[PromptRow, list[int]]]], Iterator[tuple[int, list[int], str]]]


def distill(
    prompts_path: str | os.PathLike,
    out_path: str | os.PathLike,
    base_model: str | None = "default",
    max_new_tokens: int = 256,
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    shuffle: bool = False,
    max_prompt_tokens: int = 1024,
    device: str = "auto",
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
    backend: str = "auto",
    components: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    threads: int | None = None,
    shard: tuple[int, int] | None = None,
    second_turns: bool = False,
) -> DistillSummary:
    """Generate the base model's replies to the prompts and append them to ``out_path``.

    ``backend``: ``auto`` | ``onnx`` | ``torch`` (module docstring). torch: ``model``/``tokenizer``
    may be passed already loaded (then ``base_model`` is unused); ``device`` "auto" keeps a
    passed model where it is and puts a loaded one on CUDA when there is a GPU; ``batch_size``
    prompts are generated together. onnx: ``components`` are the SpAF components exported with
    the base (default: :func:`spaf_edge.models.loading.resolve_components`); ``export`` is an
    existing export folder of the same base to use instead; ``threads`` are ONNX Runtime's.
    ``shard`` ``(K, N)``: only the selected prompts of shard K of N (:func:`shard_prompts`), so that N
    processes (each with its own ``out_path``) split the work. ``second_turns``: ``prompts_path`` holds
    first-turn rows of an earlier distill, each followed up (:mod:`spaf_edge.training.second_turns`).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError("--batch-size and --max-new-tokens must be integers >= 1.")
    refuse_evaluation_data(out_path)
    out = Path(out_path)
    if out.suffix == ".gz":
        raise ConfigError(f"--out {out}: distill appends plain JSONL lines and cannot append to a gzip file. Write "
                          "a .jsonl file (to continue a gzipped corpus, `gunzip -k` it first) and gzip it when done.")
    if second_turns:
        from spaf_edge.training.second_turns import read_first_turns

        prompt_rows = read_first_turns(prompts_path, seed)
    else:
        prompt_rows = read_prompts(prompts_path)
    rows = shard_prompts(select_prompts(prompt_rows, limit, shuffle, seed), shard)
    drawn = sampling_record(temperature, top_p, seed)
    done = repair_and_read_done(out, drawn)
    pending = [row for row in rows if row.index not in done]
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    chosen = resolve_backend(backend, device, model)
    if chosen == "torch":
        if export is not None:
            raise ConfigError("--export is an export for the onnx backend; drop it, or pass --backend onnx.")
        replies = torch_backend(base_model, model, tokenizer, device, batch_size, **sampling)
        tokenizer = replies.tokenizer
    else:
        if model is not None:
            raise ConfigError("A loaded torch model is generated with backend='torch'; the onnx backend exports "
                              "base_model itself. Pass backend='torch', or base_model instead of model.")
        if device not in ("auto", "cpu"):
            raise ConfigError(f"--device {device}: the onnx backend runs on the CPU. Use --backend torch to "
                              "generate on a GPU.")
        tokenizer = tokenizer or base_tokenizer(base_model)
    encoded = [(row, row.encode(tokenizer)) for row in pending]
    kept = [(row, ids) for row, ids in encoded if len(ids) <= max_prompt_tokens]
    kept.sort(key=lambda item: len(item[1]))
    if chosen == "onnx":
        longest = max((len(ids) for _, ids in kept), default=1)
        replies = onnx_backend(base_model, tokenizer, components, export, threads, longest + max_new_tokens,
                               **sampling)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = DistillSummary(out, 0, len(rows) - len(pending), len(encoded) - len(kept), 0, 0.0, replies.device,
                             replies.name)
    started = time.perf_counter()
    with out.open("a", encoding="utf-8") as handle, progress_bar(
        total=len(kept), desc="distill", unit="prompt", disable=not progress
    ) as bar:
        synced = time.perf_counter()
        for start in range(0, len(kept), replies.group):
            batch = kept[start : start + replies.group]
            for position, tokens, finish in replies.generate(batch):
                text = replies.tokenizer.decode(tokens, skip_special_tokens=True)
                row = output_row(batch[position][0], text, finish, replies.label, drawn)
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                handle.flush()
                if time.perf_counter() - synced >= SYNC_SECONDS:
                    os.fsync(handle.fileno())
                    synced = time.perf_counter()
                summary.new_tokens += len(tokens)
                summary.written += 1
                summary.seconds = time.perf_counter() - started
                advance(bar, 1, **{"tok/s": f"{summary.tokens_per_second:.0f}"})
            os.fsync(handle.fileno())
    summary.seconds = time.perf_counter() - started
    return summary


def resolve_backend(backend: str, device: str, model: Any = None) -> str:
    """``onnx`` or ``torch`` for ``backend``; ``auto`` is torch when CUDA is chosen or available or a model
    is passed, onnx otherwise. A bad ``device`` fails here, before anything loads."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}.")
    target = None if device == "auto" else torch_device(device)
    if backend != "auto":
        return backend
    if model is not None:
        return "torch"
    if target is None:
        import torch

        return "torch" if torch.cuda.is_available() else "onnx"
    return "torch" if target.type == "cuda" else "onnx"


def group_seed(seed: int, first_index: int) -> int:
    return seed * 1_000_003 + first_index


def torch_backend(
    base_model: str | None, model: Any, tokenizer: Any, device: str, batch_size: int, max_new_tokens: int,
    temperature: float, top_p: float, seed: int,
) -> ReplyBackend:
    """``batch_size`` prompts decoded together. On a CPU a row whose reply ends takes the next prompt at once
    (:mod:`spaf_edge.training.refill`; each prompt samples from its own seed); elsewhere transformers
    ``generate`` runs batch after batch (left padding; one seed per batch)."""
    import torch

    target = None if device == "auto" else torch_device(device)
    if model is None:
        from spaf_edge.models.loading import load_base_model

        model, tokenizer = load_base_model(base_model)
        target = target or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if target is not None:
        model.to(target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    where = str(next(model.parameters()).device)

    label = {"backend": "torch", "device": where}
    if next(model.parameters()).device.type == "cpu":
        from spaf_edge.training.refill import generate_refilled, pick_tokens

        def refill(batch: list[tuple[PromptRow, list[int]]]) -> Iterator[tuple[int, list[int], str]]:
            pick = pick_tokens(temperature, top_p, [group_seed(seed, row.index) for row, _ in batch])
            return generate_refilled(model, [ids for _, ids in batch], eos_ids, max_new_tokens, batch_size, pick)

        # One group: the slots are refilled from all prompts, and rows are written as they end.
        return ReplyBackend("torch", tokenizer, sys.maxsize, where, {**label, "batching": "refill"}, refill)

    def generate(batch: list[tuple[PromptRow, list[int]]]) -> Iterator[tuple[int, list[int], str]]:
        torch.manual_seed(group_seed(seed, batch[0][0].index))
        yield from enumerate(generate_batch(model, [ids for _, ids in batch], pad_id, eos_ids, max_new_tokens,
                                            temperature, top_p))

    return ReplyBackend("torch", tokenizer, batch_size, where, label, generate)


def onnx_backend(
    base_model: str | None, tokenizer: Any, components: str | os.PathLike | None, export: str | os.PathLike | None,
    threads: int | None, context: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
) -> ReplyBackend:
    """The ONNX Runtime engine's SpAF decoding, one prompt at a time, on an fp32 export of the base.

    ``context``: the positions the export must hold (the longest prompt plus ``max_new_tokens``).
    """
    from spaf_edge.bench.exports import cached_export
    from spaf_edge.models.loading import resolve_base_model, resolve_components
    from spaf_edge.runtime.engine import Engine

    base = resolve_base_model(base_model)
    if export is None:
        # One more row than the positions: an engine that pads one-row calls keeps one row spare.
        rows = -(-(context + 1) // EXPORT_LENGTH_STEP) * EXPORT_LENGTH_STEP
        try:
            folder = cached_export(base, resolve_components(base_model, components), "fp32", rows)
        except UnsupportedArchitectureError as exc:
            raise UnsupportedArchitectureError(f"{exc} Distill this base with --backend torch.") from exc
    else:
        if components is not None:
            raise ConfigError("--components and --export both name the SpAF components (an export holds its "
                              "own). Pass one of them.")
        folder = Path(export)
        check_export_base(folder, base)
    engine = Engine.from_folder(folder, threads=threads)
    if engine.max_length < context:
        raise ConfigError(
            f"The export {folder} holds {engine.max_length} positions, fewer than the longest prompt plus "
            f"--max-new-tokens ({context}): its replies would be cut. Lower --max-prompt-tokens or "
            "--max-new-tokens, or pass an export with a larger --max-length (or none: one is made)."
        )
    eos = set(engine.eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    def generate(batch: list[tuple[PromptRow, list[int]]]) -> Iterator[tuple[int, list[int], str]]:
        for position, (row, ids) in enumerate(batch):
            result = engine.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     top_k=0, seed=group_seed(seed, row.index))
            yield (position, *cut_reply(result.tokens, eos))

    label = {"backend": "onnx", "export": (engine.manifest.manifest_sha256 or "")[:16]}
    return ReplyBackend("onnx", tokenizer, 1, f"{engine.provider.name} (onnxruntime)", label, generate)


def base_tokenizer(base_model: str | None) -> Any:
    from transformers import AutoTokenizer

    from spaf_edge.models.loading import resolve_base_model

    return AutoTokenizer.from_pretrained(str(resolve_base_model(base_model)))


def check_export_base(folder: Path, base: Path) -> None:
    """Refuse an export made from another base model than ``base`` (their fingerprints differ)."""
    from spaf_edge.core.manifest import Manifest
    from spaf_edge.models.loading import load_base_model, model_fingerprint

    manifest = Manifest.load(folder, verify_files=False)
    model, _ = load_base_model(base)
    fingerprint = model_fingerprint(model)
    del model
    if manifest.base_fingerprint != fingerprint:
        raise ConfigError(
            f"--export {folder} was made from another base model (fingerprint {manifest.base_fingerprint}, "
            f"--base-model has {fingerprint}). Pass the export of this base, or omit --export to make one."
        )


def cut_reply(tokens: Sequence[int], eos: set[int]) -> tuple[list[int], str]:
    """The reply before its first EOS, and ``eos``; or all of it and ``length``."""
    for index, token in enumerate(tokens):
        if token in eos:
            return list(tokens[:index]), "eos"
    return list(tokens), "length"


def torch_device(name: str) -> Any:
    """``name`` as a torch.device, or a ConfigError that says what is available."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device ({exc}). Use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this torch build sees no CUDA GPU. Use --device cpu (or auto).")
    return device


def output_row(row: PromptRow, reply: str, finish_reason: str, label: dict[str, str],
               sampling: dict[str, float] | None = None) -> dict[str, Any]:
    messages = [*row.messages, {"role": "assistant", "content": reply}]
    drawn = {} if sampling is None else {"sampling": sampling}
    return {"messages": messages, "prompt_index": row.index, "finish_reason": finish_reason,
            "distilled_with": label, **drawn, **row.extra}


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError("The base model defines no EOS token; replies could not end. Set eos_token_id in its config.")
    return sorted(set(ids))


def generate_batch(
    model: Any, prompts: Sequence[list[int]], pad_id: int, eos_ids: list[int], max_new_tokens: int,
    temperature: float, top_p: float,
) -> list[tuple[list[int], str]]:
    """Left-pad, generate, and cut each reply at its first EOS. Returns (tokens, finish_reason)."""
    import torch

    from spaf_edge.training.refill import left_pad

    input_ids, attention = left_pad(prompts, pad_id)  # [B, P]
    width = input_ids.shape[1]
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            pad_token_id=pad_id, eos_token_id=eos_ids, **sampling,
        )
    return [cut_reply(tokens, set(eos_ids)) for tokens in output[:, width:].tolist()]
