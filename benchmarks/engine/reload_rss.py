"""Resident memory while one process loads, uses and drops the engine N times.

    python benchmarks/engine/reload_rss.py EXPORT_DIR [--n 50] [--tokens 4] [--threads 2]
        [--thread-pool session|global] [--no-close] [--trim] [--no-arena]

Each cycle: ``Engine.from_folder`` (sha256 check off: the files are unchanged), one short
greedy SpAF answer, ``engine.close()`` (``--no-close``: only drop the reference, as code
written before ``close()`` did), then ``gc.collect()``; it prints VmRSS from
/proc/self/status after each cycle. Diagnostics: ``--trim`` calls glibc's ``malloc_trim(0)``
after each cycle (freed heap handed back to the system: RSS that it removes was
fragmentation, not a leak); ``--no-arena`` turns off ONNX Runtime's CPU memory arena in
every session. ``MALLOC_ARENA_MAX=2`` in the environment caps glibc's per-thread arenas.
The summary compares the RSS after the warm-up cycles with the last one.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time

WARMUP = 5  # cycles before the baseline: allocators and caches settle in the first few


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def trim() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def without_arena() -> None:
    """Make every session the engine opens use no CPU memory arena."""
    from spaf_edge.runtime import engine, session

    original = session.session_options

    def options(*args, **kwargs):
        made = original(*args, **kwargs)
        made.enable_cpu_mem_arena = False
        return made

    session.session_options = options
    engine.session_options = options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--n", type=int, default=50, help="load / answer / close cycles")
    parser.add_argument("--tokens", type=int, default=4, help="new tokens per answer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--thread-pool", choices=("session", "global"), default="session")
    parser.add_argument("--no-close", action="store_true", help="drop the engine without calling close()")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each cycle")
    parser.add_argument("--no-arena", action="store_true", help="no ONNX Runtime CPU memory arena")
    args = parser.parse_args(argv)
    if args.no_arena:
        without_arena()
    from spaf_edge.runtime import Engine

    print(f"start  RSS {rss_mib():7.1f} MiB")
    rss = []
    start = time.perf_counter()
    for cycle in range(1, args.n + 1):
        engine = Engine.from_folder(args.export, threads=args.threads, verify=False, thread_pool=args.thread_pool)
        engine.generate("Name a colour.", max_new_tokens=args.tokens, temperature=0.0)
        if not args.no_close:
            engine.close()
        del engine
        gc.collect()
        if args.trim:
            trim()
        rss.append(rss_mib())
        print(f"cycle {cycle:3d}  RSS {rss[-1]:7.1f} MiB", flush=True)
    base = rss[min(WARMUP, len(rss)) - 1]
    growth = rss[-1] - base
    print(f"\n{args.n} cycles in {time.perf_counter() - start:.0f} s; RSS after cycle {min(WARMUP, len(rss))} "
          f"{base:.1f} MiB, after the last {rss[-1]:.1f} MiB ({growth:+.1f} MiB, {100 * growth / base:+.1f} %), "
          f"peak {max(rss):.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
