"""Progress bars for long work (export, train, distill, tune, agreement): one place that makes them.

On a terminal a bar redraws up to ten times a second. Written to a file or a CI log, each redraw
is one more carriage-return line, so a long run's log fills with them; there the text bar redraws
at most once every ``LOG_INTERVAL`` seconds instead.
"""

from __future__ import annotations

import sys
from typing import Any

LOG_INTERVAL = 30.0  # seconds between redraws when stderr is not a terminal


def progress_bar(iterable: Any = None, **options: Any) -> Any:
    """``tqdm(iterable, **options)``, redrawn rarely where stderr is not a terminal."""
    from tqdm.auto import tqdm
    from tqdm.notebook import tqdm_notebook

    if not issubclass(tqdm, tqdm_notebook) and not _is_terminal(sys.stderr):  # a notebook's widget stays
        options.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, **options)


def advance(bar: Any, steps: int = 1, **postfix: str) -> None:
    """Move ``bar`` on by ``steps`` and show ``postfix`` with it, redrawing only when its interval is up.

    tqdm's ``set_postfix`` redraws at once by default, which would undo the rare redraws in a log.
    """
    if postfix:
        bar.set_postfix(postfix, refresh=False)
    bar.update(steps)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
