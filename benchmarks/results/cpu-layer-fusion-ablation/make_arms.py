"""Starting points and data of the layer_fusion ablation (README.md beside this file).

Writes, under OUT:
- ``attention/``: the shipped components as they are (arm A starts here);
- ``layer_fusion/``: the same weights in a ``layer_fusion`` adapter whose fusion (state after
  layer 25, rank 64) starts fresh, so it drafts exactly as arm A does at step 0;
- ``data.jsonl``: the committed distilled replies plus PROMPTS training prompts as prompt
  rows (shuffled with seed 0; never MT-Bench).

Usage: python make_arms.py OUT [PROMPTS]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from spaf_edge.core.config import SpAFConfig
from spaf_edge.model import SpAFModel

SHIPPED = Path("models/smollm2-135m-instruct")
PROMPTS = Path("../shared/data/train_prompts.jsonl")


def main(out: Path, prompts: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    attention = SpAFModel.from_pretrained("default", components=SHIPPED)
    attention.save_spaf_components(out / "attention")
    config = SpAFConfig.load(SHIPPED).replace(adapter_kind="layer_fusion", fusion_layers=[25], fusion_rank=64)
    torch.manual_seed(0)
    fusion = SpAFModel(attention.base, config, attention.tokenizer)
    state = {k: v for k, v in attention.spaf_state_dict().items() if k != "draft_vocab"}
    missing, unexpected = fusion.load_state_dict(state, strict=False)
    new = [k for k in missing if not k.startswith("base.")]
    assert not unexpected and all(".fusion_" in k for k in new), (unexpected, new)
    fusion.set_draft_vocab(attention.draft_vocab)
    fusion.save_spaf_components(out / "layer_fusion")
    print(f"fusion parameters: {sum(fusion.state_dict()[k].numel() for k in new)}; "
          f"trainable {fusion.num_trainable_parameters()} ({100 * fusion.trainable_fraction():.2f} % of the base)")

    rows = [json.loads(line) for line in (SHIPPED / "distilled_replies.jsonl").read_text().splitlines()]
    pool = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    random.Random(0).shuffle(pool)
    rows += [{"prompt": row["prompt"], "source": row.get("source"), "license": row.get("license")}
             for row in pool[:prompts]]
    random.Random(1).shuffle(rows)
    (out / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} rows -> {out / 'data.jsonl'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4000)
