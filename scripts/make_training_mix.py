"""Write the training mix of the shipped default components (see models/smollm2-135m-instruct/README.md).

Rows: the base's own replies (chat rows from `spaf-edge distill`), then the training prompts
in a seeded random order (prompt rows: distillation needs the base's distribution on
text, not a reply). `spaf-edge train --max-examples N` then takes the first N rows.

usage: python scripts/make_training_mix.py REPLIES.jsonl PROMPTS.jsonl OUT.jsonl [SEED]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path


def main(replies: str, prompts: str, out: str, seed: int = 0) -> None:
    reply_rows = [line for line in Path(replies).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompt_rows = [line for line in Path(prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(prompt_rows)
    Path(out).write_text("".join(row + "\n" for row in reply_rows + prompt_rows), encoding="utf-8")
    print(f"{out}: {len(reply_rows)} reply rows + {len(prompt_rows)} prompt rows")


if __name__ == "__main__":
    main(*sys.argv[1:4], *[int(arg) for arg in sys.argv[4:5]])
