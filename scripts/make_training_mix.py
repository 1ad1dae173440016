"""Write the training mix of the shipped default components (see models/smollm2-135m-instruct/README.md).

Rows: the base's own replies (chat rows from `spaf-edge distill`), then the training prompts
in a seeded random order (prompt rows: distillation needs the base's distribution on
text, not a reply). `spaf-edge train --max-examples N` then takes the first N rows.
REPLY_ROWS keeps only the first replies (the committed corpus grows by appending: its first
208 rows are the replies the session-2 and fused components were trained with).

usage: python scripts/make_training_mix.py REPLIES.jsonl[.gz] PROMPTS.jsonl OUT.jsonl [SEED [REPLY_ROWS]]
"""

from __future__ import annotations

import gzip
import random
import sys
from pathlib import Path


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a JSONL file, plain or gzipped (split on newlines only: replies hold U+2028)."""
    data = gzip.decompress(Path(path).read_bytes()) if path.endswith(".gz") else Path(path).read_bytes()
    return [line for line in data.decode("utf-8").split("\n") if line.strip()]


def main(replies: str, prompts: str, out: str, seed: int = 0, reply_count: int | None = None) -> None:
    reply_rows = read_lines(replies)[:reply_count]
    prompt_rows = read_lines(prompts)
    random.Random(seed).shuffle(prompt_rows)
    Path(out).write_text("".join(row + "\n" for row in reply_rows + prompt_rows), encoding="utf-8")
    print(f"{out}: {len(reply_rows)} reply rows + {len(prompt_rows)} prompt rows")


if __name__ == "__main__":
    main(*sys.argv[1:4], *[int(arg) for arg in sys.argv[4:6]])
