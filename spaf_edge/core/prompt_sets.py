"""Benchmark prompts: a packaged set, or any JSONL file.

Packaged sets, chosen by name where a prompt file is expected (``--prompts grounded``):

- ``mt-bench`` (the default): MT-Bench first turns, open-ended chat.
- ``grounded``: 32 input-grounded prompts, 8 each of summarization, extraction, passage
  QA and code editing, whose answers copy from a passage or code in the prompt (the case
  prompt-lookup drafting is for).

A set's name wins over a file of the same name in the working directory (pass
``./grounded`` for the file). Each line of a prompt file is a JSON object with either a
``prompt`` string or an MT-Bench ``turns`` list (the first turn is used). Optional
fields: ``category`` and an id (``question_id`` or ``id``). Prompts are tokenized once,
so every runner gets the same token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spaf_edge.core.errors import ConfigError
from spaf_edge.core.jsonl import read_jsonl

DEFAULT_CATEGORY = "all"


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    text: str


DATA = Path(__file__).resolve().parents[1] / "data"
PROMPT_SETS = {  # packaged evaluation sets: never trained on (spaf_edge/data/README.md)
    "mt-bench": DATA / "mt_bench_question.jsonl",
    "grounded": DATA / "grounded_prompts.jsonl",
}


def mt_bench_path() -> Path:
    """The packaged MT-Bench questions (Apache-2.0, see spaf_edge/data/README.md)."""
    return PROMPT_SETS["mt-bench"]


def grounded_prompts_path() -> Path:
    """The packaged input-grounded prompts (sources and licenses in spaf_edge/data/README.md)."""
    return PROMPT_SETS["grounded"]


def resolve_prompts_path(source: str | Path | None) -> Path:
    """The file behind ``source``: None is MT-Bench, a packaged set's name its file, anything else a path."""
    if source is None:
        return mt_bench_path()
    return PROMPT_SETS.get(str(source), Path(source))


def grounded_passages() -> list[str]:
    """The passage or code each grounded prompt quotes (its ``passage`` field), for decontamination."""
    path = grounded_prompts_path()
    passages = []
    for number, row in read_jsonl(path):
        passage = row.get("passage")
        if not isinstance(passage, str) or not passage.strip():
            raise ConfigError(f"{path}:{number} has no 'passage' string; every grounded prompt names its passage.")
        passages.append(passage)
    return passages


def load_prompts(
    path: str | Path | None = None, limit: int | None = None, per_category: int | None = None
) -> list[BenchPrompt]:
    """Read prompts (a file, or a name in ``PROMPT_SETS``); keep the first ``per_category`` of each
    category, then the first ``limit``."""
    path = resolve_prompts_path(path)
    for name, value in (("limit", limit), ("per_category", per_category)):
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value}: give a number >= 1 (or leave it out for all).")
    if not path.is_file():
        raise ConfigError(
            f"Prompt file {path} not found. Pass a JSONL file with a 'prompt' or 'turns' field per line, or a "
            f"packaged set: {', '.join(PROMPT_SETS)}."
        )
    prompts = [_parse_row(row, path, number) for number, row in read_jsonl(path, PROMPT_FIELDS)]
    if per_category is not None:
        seen: dict[str, int] = {}
        kept = []
        for prompt in prompts:
            seen[prompt.category] = seen.get(prompt.category, 0) + 1
            if seen[prompt.category] <= per_category:
                kept.append(prompt)
        prompts = kept
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ConfigError(f"{path} holds no prompts. Add JSONL lines with a 'prompt' or 'turns' field.")
    return prompts


def encode_prompts(prompts: Sequence[BenchPrompt], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """Token ids of every prompt through one encoder (chat template applied by ``encode``)."""
    return [list(encode(prompt.text)) for prompt in prompts]


PROMPT_FIELDS = " with a 'prompt' or 'turns' field"


def _parse_row(row: dict, path: Path, number: int) -> BenchPrompt:
    where = f"{path}:{number}"
    text = row.get("prompt")
    if text is None and isinstance(row.get("turns"), list) and row["turns"]:
        text = row["turns"][0]
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            f"{where} has no prompt text. Give a non-empty 'prompt' string or an MT-Bench 'turns' list."
        )
    prompt_id = row.get("question_id", row.get("id", number))
    category = row.get("category") or DEFAULT_CATEGORY
    return BenchPrompt(id=str(prompt_id), category=str(category), text=text)
