"""Showing a core progress generator as a tqdm bar on stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from typing import TypeVar

from napari_openseg.core.progress import Progress

Result = TypeVar("Result")


def with_progress_bar(
    generator: Generator[Progress, None, Result],
    description: str,
    unit: str = "step",
    on_step: Callable[[Progress], None] | None = None,
) -> Result:
    """Drain ``generator`` while a bar counts its units; returns the generator's result.

    ``on_step`` sees each record after the bar has drawn it (print with ``tqdm.write`` to keep the bar
    whole)."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)
    try:
        while True:
            try:
                step = next(generator)
            except StopIteration as stop:
                return stop.value
            if bar.total != step.total:
                bar.total = step.total
            bar.set_postfix_str(step.stage, refresh=False)
            bar.n = step.done
            bar.refresh()
            if on_step is not None:
                on_step(step)
    finally:
        generator.close()
        bar.close()
