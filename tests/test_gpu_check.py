"""scripts/gpu_check.py, dry-run on the CPU: the scaled-down (a) and, on the tiny model folder, (b)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from tiny import fact

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_the_gpu_check_runs_on_the_cpu_and_prints_its_table(tiny_folder, tmp_path, capsys):
    import gpu_check

    records = [fact(f"k{i}", "The home city of {} is", f"Entity {i}", "Paris", "Rome") for i in range(16)]
    # The tiny covariance has no eigenvalue below AlphaEdit's absolute cut: the relative one edits.
    cfg = yaml.safe_load((tiny_folder / "tiny.yaml").read_text(encoding="utf-8"))
    cfg["alphaedit"]["nullspace_relative_threshold"] = 0.01
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    stream = tmp_path / "stream.json"
    stream.write_text(json.dumps(records), encoding="utf-8")
    res = gpu_check.main(["--device", "cpu", "--scale", "tiny", "--smollm", str(tiny_folder / "tiny-llama"),
                          "--config", str(tmp_path / "tiny.yaml"), "--corpus", str(tiny_folder / "corpus.txt"),
                          "--stream", str(stream), "--stats-tokens", "2000", "--canary-tokens", "256",
                          "--horizon-edits", "6", "--out", str(tmp_path / "gpu.json")])
    a, b = res["a"], res["b"]
    assert a["stats_tokens_per_s"] > 0 and a["projector_s"] > 0 and a["night_24_increment_bytes"] > 10_000
    assert a["edit_batch25_s_per_edit"] > 0 and a["peak_memory_gb"] > 0
    assert b["parity_relative_diff"] == 0.0  # the CPU against itself; a GPU's number goes to docs/scale.md
    for label in ("alphaedit", "alphaedit+nas"):
        assert b[label]["points"][-1]["edits"] == 6 and "collapse_point" in b[label]
    printed = capsys.readouterr().out
    assert "(a) edit_batch25_s_per_edit" in printed and "(b) alphaedit+nas" in printed
    assert json.loads((tmp_path / "gpu.json").read_text())["a"]["projector_s"] == a["projector_s"]
