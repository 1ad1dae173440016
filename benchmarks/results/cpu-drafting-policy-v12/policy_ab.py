"""One drafting policy, timed on a prompt set in its own process (alternate policies between processes).

Policies (greedy; the tokens are plain greedy's whatever the policy, checked on one prompt):
- ``lookup-fixed:D:M``: a lookup branch of at most D tokens is the step's chain when its match has M
  tokens (the engine's rule; the default is D 8, M 2);
- ``lookup-grow:D0:DMAX``: as ``lookup-fixed:D0:2``, but after a step that accepted its whole lookup
  chain the next lookup chain may be twice as long, up to DMAX; back to D0 after any other step;
- ``eta:X``: SpAF chains stop at a draft whose top probability is below X (N 4, s 0);
- ``rate:TABLE``: SpAF chains (N 8, s 0) stop where the next draft would lower the expected tokens per
  unit of time: expected tokens 1 + sum of the cumulative top probabilities, time from the verify cost
  by rows of TABLE (int4 or fp32, README) plus a draft's cost.

usage: python policy_ab.py EXPORT_DIR PROMPT_SET PER_CATEGORY POLICY OUT.jsonl
"""

import json
import sys

import numpy as np

import spaf_edge.decoding.spaf as spaf_module
from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.decoding.loop import Proposal
from spaf_edge.decoding.proposers import Proposers
from spaf_edge.decoding.tree import DraftTree
from spaf_edge.runtime import Engine

# verify cost by rows relative to one row (stack_rows.py, README) and one draft's cost (step_cost.py)
COSTS = {"int4": ((1, 2, 3, 5, 8, 12), (1, 1.06, 1.32, 1.73, 2.37, 3.2), 0.035),
         "fp32": ((1, 2, 3, 5, 8, 12), (1, 1.06, 1.12, 1.17, 1.4, 1.53), 0.012)}

folder, prompt_set, per_category, policy, out = sys.argv[1:6]
name, *args = policy.split(":")
engine = Engine.from_folder(folder, threads=2, thread_pool="global")
options: dict = {}

if name.startswith("lookup-"):
    start, limit = int(args[0]), int(args[1])
    min_match = limit if name == "lookup-fixed" else 2
    options = {"lookup_depth": start if name == "lookup-fixed" else limit}  # sizes the engine's buffers

    def chain(self, budget, settings, rng, use_spaf, use_lookup):
        found = self.lookup.matches(min(budget, self.depth), 1)
        self.from_lookup = len(found[0][1]) if found and found[0][0] >= min_match else None
        if self.from_lookup:
            return Proposal(DraftTree.from_chain([self.pending, *found[0][1]]))
        return self.spaf.propose(budget, settings, rng)

    def accepted(self, proposal, rows, _accepted=Proposers.accepted):
        whole = self.from_lookup is not None and len(rows) - 1 >= self.from_lookup
        self.depth = min(limit, 2 * self.depth) if name == "lookup-grow" and whole else start
        _accepted(self, proposal, rows)

    def begin(self, shared, active, _start=Proposers.start):
        self.depth, self.from_lookup = start, None
        return _start(self, shared, active)

    Proposers._chain, Proposers.accepted, Proposers.start = chain, accepted, begin
elif name == "eta":
    options = {"num_draft_tokens": 4, "serial_parallel_transition": 0, "draft_stop_threshold": float(args[0])}
else:
    rows, cost, draft = COSTS[args[0]]
    state: dict = {}
    top_probability = spaf_module.top_probability

    def expected_rate_rule(logits):
        """1.0 while the next draft raises expected tokens per time, else 0.0 (below the 0.5 threshold)."""
        reach = state["reach"] * float(top_probability(logits))
        drafts, tokens = state["drafts"], state["tokens"]
        now = tokens / (np.interp(drafts + 1, rows, cost) + draft * (drafts + 1))
        then = (tokens + reach) / (np.interp(drafts + 2, rows, cost) + draft * (drafts + 2))
        if then < now:
            return 0.0
        state.update(reach=reach, drafts=drafts + 1, tokens=tokens + reach)
        return 1.0

    def propose(self, budget, settings, rng, _propose=spaf_module.SpAFProposer.propose):
        state.update(reach=1.0, drafts=0, tokens=1.0)
        return _propose(self, budget, settings, rng)

    spaf_module.top_probability = expected_rate_rule
    spaf_module.SpAFProposer.propose = propose
    options = {"num_draft_tokens": 8, "serial_parallel_transition": 0, "draft_stop_threshold": 0.5}

prompts = load_prompts(prompt_set, per_category=int(per_category))
engine.generate(prompts[0].text, max_new_tokens=16, **options)  # warm-up
tokens = steps = 0
seconds = 0.0
for prompt in prompts:
    result = engine.generate(prompt.text, max_new_tokens=128, **options)
    tokens += len(result.tokens)
    steps += result.stats.verify_steps
    seconds += result.stats.wall_seconds
same = engine.generate(prompts[-1].text, max_new_tokens=128, mode="greedy").tokens == result.tokens
row = {"policy": policy, "export": folder, "prompts": prompt_set, "tok_s": round(tokens / seconds, 2),
       "tau": round(tokens / steps, 3), "same_as_greedy": same}
print(json.dumps(row))
with open(out, "a") as handle:
    handle.write(json.dumps(row) + "\n")
