"""Progress in a log file: LineProgress writes a line per tenth when its console is no terminal."""

import io

from rich.console import Console
from rich.progress import BarColumn, TextColumn

from flows.cli.common import LineProgress


def _run(terminal: bool, total: int, steps: list[int]) -> str:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=terminal, width=100)
    with LineProgress(TextColumn("{task.description}"), BarColumn(), console=console) as bar:
        task = bar.add_task("NAS pilots", total=total, rate="")
        for n in steps:
            bar.advance(task, n)
        bar.update(task, completed=total, rate="1.3 s/pilot")
    return buf.getvalue()


def test_a_log_gets_the_first_unit_and_one_line_per_tenth_with_the_rate():
    text = _run(False, 1000, [1] * 999)
    lines = [ln for ln in text.splitlines() if ln.startswith("NAS pilots: ")]
    # the first unit (the rate is then known), then every tenth
    assert [ln.split(" after")[0] for ln in lines] == [f"NAS pilots: {n:,}/1,000" for n in [1, *range(100, 1001, 100)]]
    assert lines[-1].endswith("(1.3 s/pilot)")


def test_a_jump_past_several_tenths_is_one_line():
    text = _run(False, 100, [55])
    assert [ln.split(" after")[0] for ln in text.splitlines() if ln.startswith("NAS pilots: ")] == [
        "NAS pilots: 55/100", "NAS pilots: 100/100"]


def test_a_terminal_gets_the_bar_and_no_lines():
    assert "NAS pilots: " not in _run(True, 100, [10] * 10)
