"""The horizon study's pure parts: settings, collapse point, the plot."""

from __future__ import annotations

import pytest

from flows.horizon import HorizonSettings, collapse_point, plot


def test_settings_reject_unknown_methods_and_bad_sizes():
    assert HorizonSettings(methods=("memit", "rome+nas")).methods == ("memit", "rome+nas")
    with pytest.raises(ValueError, match="unknown"):
        HorizonSettings(methods=("ft",))
    with pytest.raises(ValueError, match=">= 1"):
        HorizonSettings(batch_size=0)
    with pytest.raises(ValueError, match="canary_tokens"):
        HorizonSettings(canary_tokens=1)


def test_measurements_use_the_studys_health_sizes():
    from flows.config import config_for
    from flows.horizon import cfg_eval

    s = HorizonSettings(general_items=7, canary_tokens=512)
    ev = cfg_eval(config_for("smollm2-135m"), s)
    assert (ev.general_items, ev.canary_tokens) == (7, 512)


def test_collapse_point_is_the_first_collapsed_measurement():
    points = [{"edits": 8, "collapsed": False}, {"edits": 16, "collapsed": True}, {"edits": 24, "collapsed": True}]
    assert collapse_point(points) == 16
    assert collapse_point(points[:1]) is None
    assert collapse_point([]) is None


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
