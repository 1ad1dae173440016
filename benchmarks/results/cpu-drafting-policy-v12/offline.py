"""Offline analyses of step_logs.py's logs (greedy: the answer is known, so any chain's accepted
length at a logged step is its common prefix with the answer after that position).

usage: python offline.py proposals LOG.json [LOG.json ...]
       python offline.py drafts TABLE LOG.json   (TABLE: int4 or fp32, policy_ab.COSTS)

``proposals``: tokens per step (tau) and rows per step of other chain choices at the logged steps of
the default policy: lookup depth and minimum match, SpAF's chain extended by a lookup of its own
drafts, both chains verified together (as a batch: twice the rows). The steps stay those of the
logged run, so this ranks choices; it does not replay them.
``drafts``: how well the cumulative top probability of SpAF's drafts predicts that the drafts up to
there are accepted, and the modelled tokens per unit of time of stop rules under TABLE's costs.
"""

import json
import sys

import numpy as np

from spaf_edge.decoding.loop import common_prefix as accepted


def lookup(history, max_tokens, max_n=4):
    """The engine's best lookup branch: the longest suffix (max_n .. 1 tokens) found earlier, its most
    recent occurrence, and what followed it."""
    for n in range(min(max_n, len(history) - 1), 0, -1):
        key = history[len(history) - n:]
        for end in range(len(history) - 2, n - 2, -1):
            if history[end - n + 1:end + 1] == key and history[end + 1:end + 1 + max_tokens]:
                return n, history[end + 1:end + 1 + max_tokens]
    return 0, []


def proposals(paths):
    choices = {
        "logged (lookup 8 tokens from a 2-token match, else SpAF)": lambda s, h: s["chosen"],
        "SpAF chain only": lambda s, h: s["spaf"],
    }
    for depth in (4, 8, 16):
        for least in (1, 2, 3):
            choices[f"lookup {depth} tokens from a {least}-token match, else SpAF"] = (
                lambda d, m: lambda s, h: s["lookup"][0][1][:d] if s["lookup"] and s["lookup"][0][0] >= m else s["spaf"]
            )(depth, least)

    def extended(step, history):
        if step["lookup"] and step["lookup"][0][0] >= 2:
            return step["lookup"][0][1][:8]
        n, more = lookup(history + step["spaf"], 4)
        return step["spaf"] + (more if n >= 2 else [])

    choices["default, SpAF's chain extended by a lookup of its drafts (2-token match, 4 tokens)"] = extended
    for path in paths:
        answers = json.load(open(path))
        print(f"{path}: {sum(len(a['steps']) for a in answers)} steps")
        for label, choose in choices.items():
            tokens = rows = steps = 0
            for answer in answers:
                for step in answer["steps"]:
                    rest = answer["full"][step["T"] + 1:]
                    if rest:
                        chain = choose(step, answer["full"][:step["T"] + 1])
                        tokens += accepted(chain, rest) + 1
                        rows += len(chain) + 1
                        steps += 1
            print(f"  tau {tokens / steps:5.3f}  rows {rows / steps:5.2f}  {label}")
        tokens = rows = steps = 0
        for answer in answers:
            for step in answer["steps"]:
                rest = answer["full"][step["T"] + 1:]
                if rest:
                    branch = step["lookup"][0][1][:8] if step["lookup"] else []
                    tokens += max(accepted(step["spaf"], rest), accepted(branch, rest) if branch else 0) + 1
                    rows += len(step["spaf"]) + 1 + (len(branch) + 1 if branch else 0)
                    steps += 1
        print(f"  tau {tokens / steps:5.3f}  rows {rows / steps:5.2f}  both SpAF's chain and the lookup branch (8), verified together")


def drafts(table, path):
    sys.path.insert(0, ".")
    costs = {"int4": ((1, 2, 3, 5, 8, 12), (1, 1.06, 1.32, 1.73, 2.37, 3.2), 0.035),
             "fp32": ((1, 2, 3, 5, 8, 12), (1, 1.06, 1.12, 1.17, 1.4, 1.53), 0.012)}
    rows, cost, draft_cost = costs[table]
    steps = [step for answer in json.load(open(path)) for step in answer["steps"]]
    reach, ok = [], []
    for step in steps:
        cumulative = 1.0
        for i, p in enumerate(step["p"]):
            cumulative *= p
            reach.append(cumulative)
            ok.append(step["acc"] > i)
    reach, ok = np.array(reach), np.array(ok)
    print(f"{path}: {len(steps)} steps; cumulative top probability of drafts 1..i -> share of steps accepting them all")
    edges = (0, .05, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1.01)
    for low, high in zip(edges, edges[1:]):
        inside = (reach >= low) & (reach < high)
        print(f"  [{low:.2f}, {min(high, 1):.2f}) {inside.sum():5d} drafts, accepted prefix {ok[inside].mean():.3f}")

    def by_threshold(eta, limit):
        def length(p):
            n = 0
            for x in p[:limit]:
                if x < eta:
                    break
                n += 1
            return n
        return length

    def by_cumulative(theta, limit):
        def length(p):
            n, c = 0, 1.0
            for x in p[:limit]:
                c *= x
                if c < theta:
                    break
                n += 1
            return n
        return length

    def by_rate(p):
        n, c, tokens = 0, 1.0, 1.0
        for x in p:
            c *= x
            now = tokens / (np.interp(n + 1, rows, cost) + draft_cost * (n + 1))
            if (tokens + c) / (np.interp(n + 2, rows, cost) + draft_cost * (n + 2)) < now:
                break
            tokens += c
            n += 1
        return n

    rules = {f"eta {eta}, N 4": by_threshold(eta, 4) for eta in (0.15, 0.3, 0.5)}
    rules.update({f"cumulative {theta}, N 8": by_cumulative(theta, 8) for theta in (0.05, 0.1, 0.2, 0.25, 0.3, 0.4)})
    rules["expected tokens per time (policy_ab rate)"] = by_rate
    print(f"  modelled with the {table} costs: tokens per unit time (one-row step = 1), tau")
    for label, length in rules.items():
        tokens = time = 0.0
        for step in steps:
            n = length(step["p"])
            tokens += min(step["acc"], n) + 1
            time += np.interp(n + 1, rows, cost) + draft_cost * (n + (n < len(step["p"])))
        print(f"  {tokens / time:6.3f} {tokens / len(steps):6.3f}  {label}")


if __name__ == "__main__":
    if sys.argv[1] == "proposals":
        proposals(sys.argv[2:])
    else:
        drafts(sys.argv[2], sys.argv[3])
