"""Self-distillation data: the base model's own replies to training prompts (DESIGN §3).

Reads a prompt JSONL (``{"prompt": ..., "source": ..., "license": ...}`` per line),
generates replies in batches (left padding, ``generate``; greedy unless a temperature
is given) and appends chat rows that ``spaf-edge train`` reads:

``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "prompt_index": i,
"finish_reason": "eos" | "length", "source": ..., "license": ...}``

``source``/``license`` (and any other fields of the prompt row) are carried over for
attribution. The output is resumable: rows are appended as whole lines and flushed
per batch; on restart a partial last line is cut off and prompts whose
``prompt_index`` is already written are skipped. Prompts are processed in order of
token length so that a batch pads little; the written order therefore differs from
the prompt file's. Batched greedy decoding may differ from unbatched decoding by
float rounding after a near-tie; for training data that does not matter.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spaf_edge.errors import ConfigError
from spaf_edge.prompts import encode_prompt
from spaf_edge.training.data import read_jsonl, refuse_evaluation_data


@dataclass
class PromptRow:
    index: int  # 0-based position among the prompt file's rows
    prompt: str
    extra: dict[str, Any]  # other fields (source, license, ...), kept in the output


@dataclass
class DistillSummary:
    out: Path
    written: int  # rows written by this call
    already_done: int  # rows found from an earlier call
    skipped_long: int  # prompts longer than max_prompt_tokens
    new_tokens: int
    seconds: float
    device: str = "cpu"

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def read_prompts(path: str | os.PathLike) -> list[PromptRow]:
    refuse_evaluation_data(path)
    rows = []
    for number, row in read_jsonl(path):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{path}:{number} has no 'prompt' string. Each line must be {{\"prompt\": ...}}.")
        extra = {key: value for key, value in row.items() if key != "prompt"}
        rows.append(PromptRow(len(rows), prompt, extra))
    if not rows:
        raise ConfigError(f"{path} has no prompts.")
    return rows


def select_prompts(rows: list[PromptRow], limit: int | None, shuffle: bool, seed: int) -> list[PromptRow]:
    """The first ``limit`` prompts, or a seeded random ``limit`` of them with ``shuffle``."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: expected an integer >= 1.")
    if shuffle:
        rows = random.Random(seed).sample(rows, len(rows))
    return rows[:limit] if limit is not None else rows


def repair_and_read_done(out: Path) -> set[int]:
    """Cut a partial last line off ``out`` and return the prompt indices it holds."""
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
            done.add(int(json.loads(line)["prompt_index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{out}:{number} is not a row written by `spaf-edge distill` ({exc}). "
                "Pass a new --out file, or remove the foreign lines."
            ) from exc
    return done


def distill(
    prompts_path: str | os.PathLike,
    out_path: str | os.PathLike,
    base_model: str | None = "default",
    max_new_tokens: int = 256,
    batch_size: int = 8,
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
) -> DistillSummary:
    """Generate the base model's replies to the prompts and append them to ``out_path``.

    ``model``/``tokenizer`` may be passed already loaded (then ``base_model`` is unused).
    ``device`` "auto" keeps a passed model where it is and puts a loaded one on CUDA when
    there is a GPU.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError("--batch-size and --max-new-tokens must be integers >= 1.")
    refuse_evaluation_data(out_path)
    out = Path(out_path)
    rows = select_prompts(read_prompts(prompts_path), limit, shuffle, seed)
    done = repair_and_read_done(out)
    pending = [row for row in rows if row.index not in done]
    target = None if device == "auto" else torch_device(device)  # a bad --device fails before the load
    if model is None:
        from spaf_edge.models.loading import load_base_model

        model, tokenizer = load_base_model(base_model)
        target = target or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if target is not None:
        model.to(target)
    encoded = [(row, encode_prompt(tokenizer, row.prompt)) for row in pending]
    kept = [(row, ids) for row, ids in encoded if len(ids) <= max_prompt_tokens]
    kept.sort(key=lambda item: len(item[1]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = DistillSummary(out, 0, len(rows) - len(pending), len(encoded) - len(kept), 0, 0.0,
                             str(next(model.parameters()).device))
    started = time.perf_counter()
    with out.open("a", encoding="utf-8") as handle, tqdm(
        total=len(kept), desc="distill", unit="prompt", disable=not progress
    ) as bar:
        for start in range(0, len(kept), batch_size):
            batch = kept[start : start + batch_size]
            torch.manual_seed(seed * 1_000_003 + batch[0][0].index)
            replies = generate_batch(model, [ids for _, ids in batch], pad_id, eos_ids, max_new_tokens,
                                     temperature, top_p)
            lines = []
            for (row, _), (tokens, finish) in zip(batch, replies):
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                lines.append(json.dumps(output_row(row, text, finish), ensure_ascii=False) + "\n")
                summary.new_tokens += len(tokens)
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
            summary.written += len(batch)
            summary.seconds = time.perf_counter() - started
            bar.update(len(batch))
            bar.set_postfix({"tok/s": f"{summary.tokens_per_second:.0f}"})
    summary.seconds = time.perf_counter() - started
    return summary


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


def output_row(row: PromptRow, reply: str, finish_reason: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": reply}]
    return {"messages": messages, "prompt_index": row.index, "finish_reason": finish_reason, **row.extra}


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

    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, P]
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            pad_token_id=pad_id, eos_token_id=eos_ids, **sampling,
        )
    replies = []
    for tokens in output[:, width:].tolist():
        ends = [i for i, token in enumerate(tokens) if token in eos_ids]
        if ends:
            replies.append((tokens[: ends[0]], "eos"))
        else:
            replies.append((tokens, "length"))
    return replies
