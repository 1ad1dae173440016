"""Progress bars redraw rarely in logs and as usual on a terminal."""

from __future__ import annotations

import io
import sys

from spaf_edge.core.progress import LOG_INTERVAL, advance, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def interval(stream: io.StringIO, **options) -> float:
    with progress_bar(range(3), file=stream, **options) as bar:
        return bar.mininterval


def test_a_log_gets_a_bar_redrawn_every_log_interval(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert interval(log) == LOG_INTERVAL


def test_a_terminal_keeps_tqdms_interval_and_explicit_settings_win(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert interval(terminal) == 0.1
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert interval(log, mininterval=0) == 0


def test_advancing_with_a_postfix_does_not_force_redraws_in_a_log(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(total=200, file=log, desc="work") as bar:
        for step in range(200):
            advance(bar, 1, **{"tok/s": str(step)})
    # The first draw and the final one on close: not one per step, as set_postfix's default refresh gives.
    assert log.getvalue().count("work") == 2
    assert "tok/s=199" in log.getvalue()
