"""The reliability suite's figures: each scenario adds a row; one table is printed at the end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import pytest


@dataclass
class ScenarioFigures:
    """One row of the summary table. ``lost`` and ``corrupted`` must be 0."""

    scenario: str
    maps: int = 0
    faults: int = 0
    retries: int = 0
    objects: int = 0
    results: int = 0
    failed: int = 0
    lost: int = 0
    corrupted: int = 0
    recovery_s: float | None = None
    elapsed_s: float | None = None


_rows: list[ScenarioFigures] = []


@pytest.fixture
def report() -> Callable[..., ScenarioFigures]:
    """Call ``report(scenario=..., maps=..., ...)`` to add a row to the summary table."""

    def record(**figures: Any) -> ScenarioFigures:
        row = ScenarioFigures(**figures)
        _rows.append(row)
        return row

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _rows:
        return
    names = [f.name for f in fields(ScenarioFigures)]
    table = [[_cell(v) for v in asdict(row).values()] for row in _rows]
    widths = [max(len(n), *(len(r[i]) for r in table)) for i, n in enumerate(names)]
    terminalreporter.section("reliability figures")
    terminalreporter.write_line(
        "| " + " | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)) + " |"
    )
    terminalreporter.write_line("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        terminalreporter.write_line(
            "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)
