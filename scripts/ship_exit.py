"""Keep one trained exit of a SpAF checkpoint, in fp16, for shipping (models/smollm2-135m-instruct).

A run trained with several exits (``adapter_layers``) holds an adapter and an AlignmentHead
per exit; an export uses one. This writes a checkpoint with only ``EXIT`` (as the cutoff),
its draft vocabulary, and the weights rounded to fp16 (half the size; loading casts them
back to the model's dtype). Decoding defaults may be overridden with KEY=VALUE pairs.

usage: python scripts/ship_exit.py CHECKPOINT EXIT OUT [num_draft_tokens=N ...]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from spaf_edge.model import SpAFModel


def main(checkpoint: str, exit_layer: int, out: str, overrides: dict) -> None:
    model = SpAFModel.from_pretrained("default", components=checkpoint)
    config = model.config.replace(cutoff_layer=exit_layer, adapter_layers=[exit_layer], **overrides)
    state = {k: v for k, v in model.spaf_state_dict().items()
             if not k.startswith(("adapters.", "alignment_heads.")) or k.split(".")[1] == str(exit_layer)}
    model.build_spaf_modules(config)
    model.load_state_dict({k: v for k, v in state.items() if k != "draft_vocab"}, strict=False)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.spaf_state_dict().items()}
    # Written beside whatever else OUT holds (README, training data): component files only.
    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save_spaf_components(Path(tmp) / "components", state=half,
                                           extra_meta={"source_checkpoint": checkpoint, "stored_dtype": "float16"})
        Path(out).mkdir(parents=True, exist_ok=True)
        for file in saved.iterdir():
            shutil.copyfile(file, Path(out) / file.name)
    print(json.dumps({"out": out, "exit": exit_layer, "parameters": model.num_trainable_parameters(),
                      "percent_of_base": round(100 * model.trainable_fraction(), 3)}))


if __name__ == "__main__":
    pairs = dict(arg.split("=", 1) for arg in sys.argv[4:])
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], {k: json.loads(v) for k, v in pairs.items()})
