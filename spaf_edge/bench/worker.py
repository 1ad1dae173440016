"""``python -m spaf_edge.bench.worker``: one runner alone in its own process.

The first stdin line is a JSON request naming a runner and a :class:`BenchContext`.
- ``mode: memory`` loads the runner, generates once and replies with the process's
  RSS at start and its peak (bytes).
- ``mode: serve`` loads the runner, replies ``{"ready": true, "settings": ...}``, then answers one
  generate request per stdin line (``prompt_ids``, ``max_new_tokens``, ``seed``) with
  ``tokens`` and ``stats`` until stdin closes. Used for baselines that need another
  interpreter (e.g. optimum in its own venv).
Replies are single JSON lines on the original stdout; whatever libraries print goes to
stderr. A failure replies ``{"error": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, TextIO

from spaf_edge.bench.baselines import BenchContext, resolve_runner
from spaf_edge.bench.memory import current_rss_bytes, peak_rss_bytes


def main() -> int:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints cannot corrupt the reply stream
    sys.stdout = sys.stderr
    try:
        request = json.loads(sys.stdin.readline())
        start_rss = current_rss_bytes()
        runner = resolve_runner(request["runner"])(BenchContext.from_dict(request["context"]))
        runner.load()
        if request["mode"] == "memory":
            out = runner.generate(request["prompt_ids"], request["max_new_tokens"], request.get("seed", 0))
            _reply(replies, start_rss_bytes=start_rss, peak_rss_bytes=peak_rss_bytes(), new_tokens=len(out.tokens))
            return 0
        _reply(replies, ready=True, settings=runner.settings)
        for line in sys.stdin:
            call = json.loads(line)
            out = runner.generate(call["prompt_ids"], call["max_new_tokens"], call.get("seed", 0))
            _reply(replies, tokens=out.tokens, stats=out.stats.to_dict(), speculation=out.speculation)
        runner.close()
        return 0
    except Exception as exc:  # the parent reports it; the traceback goes to stderr
        traceback.print_exc()
        _reply(replies, error=f"{type(exc).__name__}: {exc}")
        return 1


def _reply(stream: TextIO, **fields: Any) -> None:
    stream.write(json.dumps(fields) + "\n")
    stream.flush()


if __name__ == "__main__":
    sys.exit(main())
