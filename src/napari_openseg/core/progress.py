"""Progress records that every slow core generator yields, and the loop that drains one."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

Result = TypeVar("Result")


@dataclass
class Progress:
    """One step of a long operation: ``done`` of ``total`` units of ``stage``.

    ``payload`` carries partial results a viewer may show early (for example finished slices).
    Each yield is a place where the consumer may stop the generator to cancel.
    """

    done: int
    total: int
    stage: str = ""
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def run_to_end(generator: Generator[Progress, None, Result]) -> Result:
    """Exhaust a progress generator and return its result (the generator's return value)."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value
