"""The GX suite in a child process: same results as in-process, GX never imported by the
caller, the child stopped by ``close`` (the child's own life: tests/flows/test_child.py).

A spawned child imports GX in about two seconds, so one module-level child serves the tests
that do not stop it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from nights import record, write_batch

from flows.facts.gx_process import GXProcess
from flows.facts.gx_suite import FactBatchSuite
from flows.facts.validate import validate_batch

REPO = Path(__file__).resolve().parents[3]


# Valid records and one the GX suite refuses (prompt longer than the night's bound).
BATCH = [
    record("ok-0", "Eiffel Tower"),
    record("ok-1", "Mount Fuji", prompt="{} is located in the country of", target_new="Chile", target_true="Japan"),
    record("long", "Place 2", prompt="The {} is located in" + " the city" * 32),
]


@pytest.fixture(scope="module")
def child():
    suite = GXProcess()
    yield suite
    suite.close()


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    return write_batch(tmp_path_factory.mktemp("gx-child") / "2025-03-01.jsonl", BATCH)


def test_child_gives_the_in_process_results(child, batch, tok):
    here = validate_batch(batch, tok, suite=FactBatchSuite())
    there = validate_batch(batch, tok, suite=child)
    assert not there.passed
    assert {p.rule for p in there.problems} == {"gx:prompt_length"}
    assert there.problems == here.problems
    assert there.expectations == here.expectations
    assert there.sha256 == here.sha256


def test_close_stops_the_child_and_the_next_run_starts_one(batch, tok):
    suite = GXProcess()
    validate_batch(batch, tok, suite=suite)
    assert suite.running
    suite.close()
    assert not suite.running
    again = validate_batch(batch, tok, suite=suite)
    assert {p.rule for p in again.problems} == {"gx:prompt_length"}
    suite.close()


def test_the_caller_never_imports_great_expectations(batch):
    """In a fresh interpreter: validate through the default (shared) child, then look."""
    code = (
        "import sys\n"
        "from tiny import tiny_tokenizer\n"
        "from flows.facts.validate import validate_batch\n"
        "from flows.facts.gx_process import shared_suite\n"
        f"v = validate_batch({str(batch)!r}, tiny_tokenizer())\n"
        "shared_suite().close()\n"
        "print(sorted({p.rule for p in v.problems}), 'great_expectations' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "['gx:prompt_length'] False"
