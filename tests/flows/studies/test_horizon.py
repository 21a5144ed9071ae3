"""The horizon study's pure parts: settings, collapse point, the plot."""

from __future__ import annotations

import pytest

from flows.studies.horizon import HorizonSettings
from flows.studies.horizon_points import collapse_point, past_collapse, plot, verdict_point


def test_settings_reject_unknown_methods_and_bad_sizes():
    assert HorizonSettings(methods=("memit", "rome+nas")).methods == ("memit", "rome+nas")
    with pytest.raises(ValueError, match="unknown"):
        HorizonSettings(methods=("ft",))
    with pytest.raises(ValueError, match=">= 1"):
        HorizonSettings(batch_size=0)
    with pytest.raises(ValueError, match="canary_tokens"):
        HorizonSettings(canary_tokens=1)


def test_measurements_use_the_studys_health_sizes():
    from flows.config.model import config_for
    from flows.studies.horizon import cfg_eval

    s = HorizonSettings(general_items=7, canary_tokens=512)
    ev = cfg_eval(config_for("smollm2-135m"), s)
    assert (ev.general_items, ev.canary_tokens) == (7, 512)


def _pt(edits, score, ppl, collapsed=False):
    return {"edits": edits, "collapsed": collapsed, "metrics": {"editing_score": score, "perplexity_ratio": ppl}}


def test_collapse_point_is_cp60_and_the_verdict_is_apart():
    points = [_pt(8, 80, 1.1, collapsed=True), _pt(16, 75, 2.01), _pt(24, 59, 1.5)]
    assert collapse_point(points) == 16  # perplexity above 2x; the gate's verdict fired earlier
    assert verdict_point(points) == 8
    assert collapse_point([points[0], points[2]]) == 24  # editing score below 60
    assert collapse_point([_pt(8, None, 2.0)]) is None  # exactly 2x is not above it
    assert collapse_point([]) is None


def test_a_method_stops_after_its_collapse():
    s = HorizonSettings(stop_after_collapse=1)
    points = [_pt(8, 80, 1.1), _pt(16, 75, 2.5)]
    assert not past_collapse(points, s)
    assert past_collapse([*points, _pt(24, 70, 2.9)], s)
    assert past_collapse(points, HorizonSettings(stop_after_collapse=0))


def test_plot_writes_a_png_with_a_line_per_method(tmp_path):
    def pts(growth):
        return [{"edits": e, "metrics": {"norm_ratio_max": 1 + growth * e, "editing_score": 90 - e,
                                         "perplexity_ratio": 1 + growth}} for e in (8, 16)]

    results = {"model": "tiny", "settings": {"stream_length": 16, "batch_size": 4},
               "base_point": {"norm_ratio_max": 1.0, "perplexity_ratio": 1.0, "editing_score": None},
               "methods": {"memit": {"points": pts(0.1)}, "memit+nas": {"points": pts(0.001)}}}
    path = plot(results, tmp_path / "horizon.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # the temp file was renamed away


def test_retention_sample_is_fixed_for_a_seed_and_bounded():
    from flows.studies.horizon import retention_sample

    assert retention_sample(30, 10, 200, 0) == list(range(30))  # all earlier edits while few
    a, b = retention_sample(3000, 10, 200, 0), retention_sample(3000, 10, 200, 0)
    assert a == b and len(a) == 210 and a[-10:] == list(range(2990, 3000))
    assert retention_sample(3000, 10, 200, 1) != a  # another seed, another sample
    later = retention_sample(3010, 10, 200, 0)
    assert len(set(a[:200]) & set(later[:200])) > 180  # successive samples share most members
    assert len(later) == 210 and later == sorted(later)


def test_measurements_are_dense_first_then_sparse():
    from flows.studies.horizon import next_measurement

    s = HorizonSettings(eval_every=250, eval_every_dense=100, dense_until=1000)
    marks, done = [], 0
    while done < 2000:
        done = next_measurement(done, s)
        marks.append(done)
    assert marks == [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1250, 1500, 1750, 2000]
    assert next_measurement(0, HorizonSettings(eval_every=10)) == 10


def test_adding_a_method_keeps_the_study_folder(tmp_path):
    from flows.studies.horizon import study_dir

    a = study_dir(tmp_path, "m", HorizonSettings(methods=("memit",)), tmp_path / "s.json")
    b = study_dir(tmp_path, "m", HorizonSettings(methods=("memit", "alphaedit+nas")), tmp_path / "s.json")
    assert a == b != study_dir(tmp_path, "m", HorizonSettings(batch_size=7), tmp_path / "s.json")


def test_a_changed_model_config_is_another_study(tmp_path):
    import dataclasses

    from flows.config.model import config_for
    from flows.studies.horizon import study_dir

    cfg = config_for("smollm2-135m")
    slack = dataclasses.replace(cfg, alphaedit=dataclasses.replace(
        cfg.alphaedit, values=dataclasses.replace(cfg.alphaedit.values, tail_group_slack=7)))
    s, src = HorizonSettings(methods=("alphaedit+nas",)), tmp_path / "s.json"
    assert study_dir(tmp_path, "m", s, src, cfg) == study_dir(tmp_path, "m", s, src, cfg)
    assert study_dir(tmp_path, "m", s, src, cfg) != study_dir(tmp_path, "m", s, src, slack)


def test_amortised_line_judges_only_the_targets_stream(monkeypatch):
    from flows.engine import precision
    from flows.studies import horizon_points

    monkeypatch.setattr(precision, "cpu_facts", lambda: {"cpu": "x", "bf16_flags": ["amx_bf16"]})
    pts = [{"edits": e, "seconds_per_edit": 0.8, "seconds_per_edit_all": s, "phase_seconds": {"values": 1.0}}
           for e, s in ((500, 0.9), (1000, 1.2), (1250, 0.5))]
    ten = HorizonSettings(methods=("alphaedit+nas",), batch_size=10)
    line = horizon_points.amortised_line("alphaedit+nas", pts, ten)
    assert "1.20 s/edit amortised over 1000 edits" in line and "(missed)" in line  # 1250 is past the window
    assert "(met)" in horizon_points.amortised_line("alphaedit+nas", [{**pts[1], "seconds_per_edit_all": 0.99}], ten)
    assert "not the target's stream" in horizon_points.amortised_line("memit", pts, ten)
    assert "not the target's stream" in horizon_points.amortised_line("alphaedit+nas", pts[:1], ten)
    monkeypatch.setattr(precision, "cpu_facts", lambda: {"cpu": "x", "bf16_flags": []})
    assert "target <= 2.0 s" in horizon_points.amortised_line("alphaedit+nas", pts, ten)
    assert horizon_points.amortised_line("alphaedit+nas", [{"edits": 10, "seconds_per_edit": 1.0}], ten) is None
