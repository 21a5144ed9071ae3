"""The norm-ratio forecast on hand-made histories: a line, an exponential, a flat norm."""

from __future__ import annotations

import math

import pytest

from nas_core.collapse import forecast


def test_linear_growth_is_forecast_by_the_line():
    history = [(0, 1.0)] + [(e, 1.0 + 1e-3 * e) for e in (100, 200, 300)]
    f = forecast(history, bound=1.5)
    assert f.linear == pytest.approx(500 - 300)
    # An exponential fitted to a line's excess (0.1, 0.2, 0.3) extrapolates faster: the worse one is shown.
    assert f.exponential is not None and f.exponential < f.linear
    assert f.worst == f.exponential and f.edits == 300


def test_exponential_growth_is_forecast_by_the_exponential_and_it_is_the_worse():
    history = [(0, 1.0)] + [(e, 1.0 + 0.01 * math.exp(e / 100)) for e in (100, 200, 300, 400)]
    f = forecast(history, bound=1.5)
    crossing = 100 * math.log(0.5 / 0.01)  # 391 edits: already past at 400
    assert f.exponential == pytest.approx(max(crossing - 400, 0.0), abs=1e-6)
    history = [(0, 1.0)] + [(e, 1.0 + 0.001 * math.exp(e / 100)) for e in (100, 200, 300)]
    f = forecast(history, bound=1.5)
    assert f.exponential == pytest.approx(100 * math.log(500) - 300, rel=1e-6)
    assert f.worst == f.exponential < f.linear


def test_a_flat_or_shrinking_norm_has_no_forecast():
    assert forecast([(0, 1.0), (100, 1.0), (200, 1.0)], 1.5).worst is None
    assert forecast([(0, 1.0)], 1.5).worst is None
    shrinking = forecast([(0, 1.0), (100, 1.02), (200, 1.01), (300, 1.005)], 1.5)
    assert shrinking.exponential is None and shrinking.linear is not None


def test_each_night_records_the_forecast_and_status_shows_it(night, tmp_path):
    from nights import write_batch
    from tiny import FACTS, fact

    from flows.ledger.records import Ledger
    from flows.refresh import operations

    write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    night()
    write_batch(tmp_path / "inbox" / "night-02.jsonl", [fact(*FACTS[1])])
    _, params = night(promotion={"forecast_warn_nights": 1e9})  # every night warns
    entries = Ledger(params.roots.ledger).promotions()
    assert [set(e["forecast"]) for e in entries] == [{"edits_left_linear", "edits_left_exponential", "edits_left",
                                                      "nights_left"}] * 2
    assert entries[-1]["forecast"]["edits_left"] is not None and entries[-1]["forecast"]["nights_left"] > 0
    status = operations.status(params)
    assert status["forecast"]["edits_left"] is not None
