"""Decoding settings timed side by side on one engine, greedy.

Every prompt runs once per setting, the settings' order rotating from prompt to prompt (and from
pass to pass), so a drifting machine slows all settings alike; separate processes per setting do
not resolve 10 % on a shared VM. Per pass and setting: tok/s over the set, tau, the ratio to the
first setting, and how many answers equal plain greedy's (they must all).

A setting is ``key=value`` pairs joined by ``,`` (engine options: ``draft_stop_threshold=0.3``,
``lookup_start=8,lookup_depth=16``, ``proposers=spaf``, ``mode=greedy`` for plain decoding); ``default`` is
the export's own defaults.

usage: python benchmarks/engine/paired_settings.py EXPORT_DIR PROMPT_SET PER_CATEGORY PASSES OUT.jsonl
                                                   SETTING [SETTING ...]
"""

from __future__ import annotations

import json
import math
import sys

from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.runtime import Engine

MAX_NEW_TOKENS = 128


def parse(setting: str) -> dict:
    if setting == "default":
        return {}
    options = {}
    for pair in setting.split(","):
        key, value = pair.split("=")
        options[key] = value if key in ("proposers", "mode") else json.loads(value)
    return options


def main(folder: str, prompt_set: str, per_category: str, passes: str, out: str, *settings: str) -> None:
    engine = Engine.from_folder(folder, threads=2, thread_pool="global")
    ids = [engine.encode(p.text) for p in load_prompts(prompt_set, per_category=int(per_category))]
    options = {name: parse(name) for name in settings}
    engine.generate(ids[0], max_new_tokens=16, **options[settings[0]])  # warm-up
    reference = [engine.generate(x, max_new_tokens=MAX_NEW_TOKENS, mode="greedy").tokens for x in ids]
    ratios: dict[str, list[float]] = {name: [] for name in settings}
    for run in range(int(passes)):
        seconds, tokens, steps, same = ({name: 0 for name in settings} for _ in range(4))
        for i, x in enumerate(ids):
            for j in range(len(settings)):
                name = settings[(i + j + run) % len(settings)]
                result = engine.generate(x, max_new_tokens=MAX_NEW_TOKENS, **options[name])
                seconds[name] += result.stats.wall_seconds
                tokens[name] += len(result.tokens)
                steps[name] += result.stats.verify_steps
                same[name] += result.tokens == reference[i]
        first = tokens[settings[0]] / seconds[settings[0]]
        with open(out, "a") as handle:
            for name in settings:
                rate = tokens[name] / seconds[name]
                ratios[name].append(rate / first)
                row = {"export": folder, "prompts": prompt_set, "pass": run, "setting": name,
                       "tok_s": round(rate, 2), "tau": round(tokens[name] / steps[name], 3),
                       "vs_first": round(rate / first, 3), "same_as_greedy": f"{same[name]}/{len(ids)}"}
                print(json.dumps(row), flush=True)
                handle.write(json.dumps(row) + "\n")
    for name in settings:
        mean = math.exp(sum(map(math.log, ratios[name])) / len(ratios[name]))
        print(f"{name}: {mean:.3f}x the first setting (geometric mean of {len(ratios[name])} passes)")


if __name__ == "__main__":
    main(*sys.argv[1:])
