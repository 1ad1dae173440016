"""Engine lifetime (issue 15): ``close()`` releases the sessions and the memory they freed.

benchmarks/engine/reload_rss.py and benchmarks/engine/soak.py measure the same on the real
model; these tests keep it true on a tiny export.
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref

import pytest
from conftest import make_tiny_spaf, make_tiny_tokenizer

from spaf_edge.core.errors import ConfigError
from spaf_edge.exporters import export_model
from spaf_edge.runtime.engine import Engine

pytestmark = pytest.mark.usefixtures("single_thread")

CYCLES = 30
# Load, answer, close, CYCLES times in a fresh process; every closed engine stays referenced.
RELOADS = """
import gc, json, sys
from spaf_edge.runtime import Engine

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))

closed, rss = [], []
for _ in range(int(sys.argv[2])):
    engine = Engine.from_folder(sys.argv[1], threads=1, verify=False)
    engine.generate([1, 2, 3], max_new_tokens=2, chat=False, temperature=0.0)
    engine.close()
    closed.append(engine)
    gc.collect()
    rss.append(rss_mib())
print(json.dumps(rss))
"""


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A small random export whose weights (~15 MB) make a leaked engine show in RSS."""
    model = make_tiny_spaf("llama", hidden_size=256, intermediate_size=1024)
    model.tokenizer = make_tiny_tokenizer()
    return export_model(model, tmp_path_factory.mktemp("soak") / "export", progress=False)


def test_close_releases_the_sessions_and_the_embedding_file(export):
    with Engine.from_folder(export) as engine:
        engine.generate([1, 2, 3], max_new_tokens=2, chat=False, temperature=0.0)
        decoder, calls = engine.decoder, engine.decoder.proposer.spaf.calls
        graphs = (decoder.lower, decoder.upper, calls.drafter, calls.draft_head)
        sessions = [weakref.ref(graph.session) for graph in graphs]
        del decoder, calls, graphs
        embeddings = engine.decoder.embeddings
    assert [session() for session in sessions] == [None] * 4
    assert embeddings._file.closed
    engine.close()  # a second close does nothing
    with pytest.raises(ConfigError, match="was closed"):
        engine.generate([1, 2, 3], max_new_tokens=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc; glibc's malloc_trim")
def test_reloading_the_engine_does_not_grow_resident_memory(export):
    """After the first cycle, RSS stays within a few MiB: a session kept by a closed engine adds
    ~8 MiB a cycle, and the heap that closed sessions freed but glibc kept adds ~20 MiB."""
    done = subprocess.run([sys.executable, "-c", RELOADS, str(export), str(CYCLES)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert max(rss[1:]) - rss[0] < 4.0, [round(value, 1) for value in rss]
