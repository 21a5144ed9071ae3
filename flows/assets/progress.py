"""Progress on stderr while a model is fetched: a rich display on a terminal, nothing elsewhere.

Library bars are kept out of the display through public switches only: transformers' own bars
are turned off for a block and restored afterwards (:func:`quiet_transformers`); a bar that no
switch reaches gets the terminal to itself while the display is paused (:meth:`Progress.paused`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Progress:
    """Thin wrapper over ``rich.progress.Progress`` (disabled when not on a terminal)."""

    def __init__(self, enabled: bool | None):
        from rich.console import Console
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        console = Console(stderr=True)
        if enabled is None:
            enabled = console.is_terminal
        self._meta: dict[int, list[Any]] = {}  # task -> [unit, total, completed]
        self._rich = RichProgress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[amount]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )

    def __enter__(self) -> Progress:
        self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._rich.__exit__(*exc)

    def add(self, description: str, total: float | None = None, unit: str = "") -> int:
        task = self._rich.add_task(description, total=total, amount="")
        self._meta[task] = [unit, total, 0.0]
        return task

    def advance(self, task: int, n: float = 1) -> None:
        meta = self._meta[task]
        meta[2] += n
        unit, total, done = meta
        if unit == "bytes":
            amount = f"{done / 1e6:.0f}/{total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
        else:
            amount = f"{int(done)}/{int(total)}" if total else f"{int(done)}"
        self._rich.update(task, advance=n, amount=amount)

    def remove(self, task: int) -> None:
        self._meta.pop(task, None)
        self._rich.remove_task(task)

    @contextmanager
    def status(self, description: str) -> Iterator[int]:
        """An indeterminate (spinner) task for the duration of the block."""
        task = self.add(description)
        try:
            yield task
        finally:
            self.remove(task)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Take the display off the terminal for the block, so a library's own bar can draw there."""
        self._rich.stop()
        try:
            yield
        finally:
            self._rich.start()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Turn transformers' own progress bars off for the block (its public switch), then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


__all__ = ("Progress", "quiet_transformers")
