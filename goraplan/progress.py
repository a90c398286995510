"""Progress of a long loop, readable both on a terminal and in a log file.

On a terminal: a tqdm bar. Anywhere else (a log file, a pipe, CI): one plain line each time another
``every_percent`` of the work is done, because a redrawn bar leaves kilobytes of ``\\r`` in a log.
``TQDM_DISABLE=1`` (tqdm's own switch) turns both off.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Protocol, TextIO

__all__ = ["LineProgress", "Progress", "progress", "quiet_library_bars"]

_TRUE = {"1", "true", "yes", "on"}


class Progress(Protocol):
    def advance(self, steps: int = 1, **values: str) -> None: ...

    def close(self) -> None: ...


def progress(total: int, desc: str, *, unit: str = "step", enabled: bool = True, stream: TextIO | None = None,
             every_percent: float = 5.0) -> Progress:
    """A progress reporter for `total` steps: a tqdm bar on a terminal, `LineProgress` elsewhere, silent
    when not `enabled` (other ranks) or when ``TQDM_DISABLE`` is set.

    >>> bar = progress(4, "gradient steps", stream=io.StringIO())  # doctest: +SKIP
    >>> bar.advance(1, loss="2.3130")  # doctest: +SKIP
    """
    stream = stream if stream is not None else sys.stderr
    if not enabled or os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE:
        return _Silent()
    if _is_terminal(stream):
        return _Bar(total, desc, unit, stream)
    return LineProgress(total, desc, stream=stream, every_percent=every_percent, unit=unit)


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Turn off the bars of transformers, datasets and huggingface_hub (loading weights, mapping data)
    when `stream` (stderr) is no terminal or ``TQDM_DISABLE`` is set: a CLI's log then holds only its lines."""
    stream = stream if stream is not None else sys.stderr
    if _is_terminal(stream) and os.environ.get("TQDM_DISABLE", "").strip().lower() not in _TRUE:
        return
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Silent:
    def advance(self, steps: int = 1, **values: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: int, desc: str, unit: str, stream: TextIO):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream)

    def advance(self, steps: int = 1, **values: str) -> None:
        self._bar.update(steps)
        if values:
            self._bar.set_postfix(values)

    def close(self) -> None:
        self._bar.close()


class LineProgress:
    """One line per `every_percent` of `total` (and one at the end), e.g.
    ``gradient steps: 16/64 (25%), 3.1 s, loss=2.3130``.

    >>> import io
    >>> out = io.StringIO()
    >>> bar = LineProgress(4, "steps", stream=out, every_percent=50)
    >>> for _ in range(4):
    ...     bar.advance(1, loss="1.0")
    >>> [line.split(",")[0] for line in out.getvalue().splitlines()]
    ['steps: 2/4 (50%)', 'steps: 4/4 (100%)']
    """

    def __init__(self, total: int, desc: str, *, stream: TextIO, every_percent: float = 5.0, unit: str = "step"):
        self.total, self.desc, self.stream, self.unit = max(total, 0), desc, stream, unit
        self.every = max(every_percent, 0.0) / 100
        self.done = 0
        self._next = self.every  # the next fraction of `total` that prints a line
        self._started = time.perf_counter()
        self._last_printed = -1

    def advance(self, steps: int = 1, **values: str) -> None:
        self.done += steps
        if self.total == 0:
            return
        fraction = self.done / self.total
        if fraction + 1e-12 >= self._next or self.done >= self.total:
            self._print(values)
            while self._next <= fraction + 1e-12:
                self._next += self.every or 1.0

    def close(self) -> None:
        pass

    def _print(self, values: dict[str, str]) -> None:
        if self.done == self._last_printed:
            return
        self._last_printed = self.done
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        shown = "".join(f", {name}={value}" for name, value in values.items())
        elapsed = time.perf_counter() - self._started
        print(f"{self.desc}: {self.done}/{self.total}{percent}, {elapsed:.1f} s{shown}", file=self.stream, flush=True)
