"""Per-step logs of the engine's greedy SpAF decoding, for the offline analyses in offline.py.

- ``proposals``: with the default settings before this session (spaf+lookup chains, lookup chains of
  a fixed 8 tokens from a 2-token match), each step's SpAF chain (computed
  even when a lookup branch is chosen), its best lookup branches (up to 16 tokens, 3 branches, with
  their match lengths) and the chosen chain; with the prompt and the answer's tokens.
- ``drafts``: SpAF chains alone (``proposers="spaf"``), N=8, s=0, no stop threshold: each draft's top
  probability and how many drafts the step accepted.

usage: python step_logs.py proposals|drafts EXPORT_DIR PROMPT_SET PER_CATEGORY OUT.json
"""

import json
import sys
from dataclasses import replace

import spaf_edge.decoding.spaf as spaf_module
from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.decoding.proposers import Proposers
from spaf_edge.runtime import Engine

kind, folder, prompt_set, per_category, out = sys.argv[1:6]
engine = Engine.from_folder(folder, threads=2, thread_pool="global")
steps: list[dict] = []
chain, accepted = Proposers._chain, Proposers.accepted

if kind == "proposals":
    def logged_chain(self, budget, settings, rng, use_spaf, use_lookup):
        found = self.lookup.matches(min(budget, 16), 3)
        spaf = self.spaf.propose(budget, replace(settings, tree_width=1), rng)
        chosen = chain(self, budget, settings, rng, use_spaf, use_lookup)
        steps.append({"T": len(self.lookup.history()) - 1, "spaf": spaf.tokens,
                      "lookup": [(n, [int(t) for t in branch]) for n, branch in found], "chosen": chosen.tokens})
        return chosen

    Proposers._chain = logged_chain
    options = {"lookup_start": 8, "lookup_depth": 8}
else:
    probabilities: list[float] = []
    top_probability = spaf_module.top_probability

    def logged_top(logits):
        probabilities.append(float(top_probability(logits)))
        return probabilities[-1]

    def logged_accepted(self, proposal, rows):
        steps.append({"p": list(probabilities), "n": len(proposal.tree) - 1, "acc": len(rows) - 1})
        probabilities.clear()
        accepted(self, proposal, rows)

    spaf_module.top_probability = logged_top
    Proposers.accepted = logged_accepted
    options = {"num_draft_tokens": 8, "serial_parallel_transition": 0, "draft_stop_threshold": 1e-9,
               "proposers": "spaf"}

answers = []
for prompt in load_prompts(prompt_set, per_category=int(per_category)):
    steps.clear()
    result = engine.generate(prompt.text, max_new_tokens=128, **options)
    ids = engine.encode(prompt.text)
    answers.append({"id": prompt.id, "category": prompt.category, "n_prompt": len(ids),
                    "full": list(ids) + list(result.tokens), "steps": list(steps)})
with open(out, "w") as handle:
    json.dump(answers, handle)
