"""Thread pools of the engine's sessions: per session (library default) or ONNX Runtime's process-wide pool.

The global pool changes the whole process (every later session must use it), so those checks
run in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import make_tiny_spaf

from spaf_edge.core.config import THREAD_POOL_ENV
from spaf_edge.core.errors import ConfigError
from spaf_edge.exporters import export_model
from spaf_edge.runtime.session import check_thread_pool, session_options

GLOBAL_POOL_SCRIPT = textwrap.dedent("""
    import json, sys
    from spaf_edge.core.errors import ConfigError
    from spaf_edge.runtime import Engine
    from spaf_edge.runtime.session import global_pool_threads
    from spaf_edge.core.shared_weights import SharedWeights
    from spaf_edge.runtime.session import open_shared_session

    folder = sys.argv[1]
    prompt = [1, 7, 19, 42, 5]
    per_session = Engine.from_folder(folder, threads=2, thread_pool="session")
    expected = per_session.generate(prompt, max_new_tokens=12, temperature=0.0).tokens
    assert global_pool_threads() is None
    engine = Engine.from_folder(folder, threads=2, thread_pool="global")
    out = {"pool": global_pool_threads(), "same": engine.generate(prompt, max_new_tokens=12,
                                                                   temperature=0.0).tokens == expected}
    import spaf_edge.runtime.engine as engine_module
    engine_module.default_threads = lambda: 8  # 3 threads on a 2-core machine would be capped to 2
    try:
        Engine.from_folder(folder, threads=3, thread_pool="global")
    except ConfigError as exc:
        out["resize"] = str(exc)
    # sessions made after the pool exists comply with it: another engine (even asking for per-session
    # pools) and open_shared_session
    again = Engine.from_folder(folder, threads=2, thread_pool="session")
    out["again"] = again.generate(prompt, max_new_tokens=12, temperature=0.0).tokens == expected
    open_shared_session(SharedWeights(folder), "upper.onnx")
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    model = make_tiny_spaf("llama", hidden_size=64)
    return export_model(model, tmp_path_factory.mktemp("threads") / "export", max_length=64, progress=False)


def test_global_pool_is_lossless_and_fixed_in_size(tiny_export):
    env = {**os.environ, THREAD_POOL_ENV: "session"}
    done = subprocess.run([sys.executable, "-c", GLOBAL_POOL_SCRIPT, str(tiny_export)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["pool"] == 2 and out["same"] and out["again"]
    assert "already has 2 threads and cannot be resized" in out["resize"]


def test_default_pool_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(THREAD_POOL_ENV, raising=False)
    assert check_thread_pool(None) == "session"
    monkeypatch.setenv(THREAD_POOL_ENV, "global")
    assert check_thread_pool(None) == "global"
    assert check_thread_pool("session") == "session"
    monkeypatch.setenv(THREAD_POOL_ENV, "shared")
    with pytest.raises(ConfigError, match="SPAF_EDGE_THREAD_POOL='shared'.*session, global"):
        check_thread_pool(None)
    with pytest.raises(ConfigError, match="thread_pool='big'"):
        session_options(2, "big")


def test_per_session_pools_do_not_spin():
    options = session_options(2, "session")
    assert options.use_per_session_threads and options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_cli_puts_engines_on_the_global_pool_by_default(tiny_export):
    """The CLI's --thread-pool (default global, env SPAF_EDGE_THREAD_POOL) becomes the engines' default."""
    env = {key: value for key, value in os.environ.items() if key != THREAD_POOL_ENV}
    script = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from spaf_edge.cli import main
        from spaf_edge.runtime import Engine
        from spaf_edge.runtime.session import global_pool_threads
        result = CliRunner().invoke(main, [*sys.argv[2:], "info", sys.argv[1]])
        assert result.exit_code == 0, result.output
        engine = Engine.from_folder(sys.argv[1], threads=2)
        print(engine.thread_pool, global_pool_threads())
    """)
    pools = []
    for extra in ([], ["--thread-pool", "session"]):
        done = subprocess.run([sys.executable, "-c", script, str(tiny_export), *extra], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        pools.append(done.stdout.strip().splitlines()[-1])
    assert pools == ["global 2", "session None"]
