"""The nightly-flow harness the refresh, fault, integrity and bad-input tests share.

``night(**overrides) -> (outcomes, params)`` runs one Prefect night on the tiny model with
params for the calling test (its own inbox, ledger and checkpoints; shared caches).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from flows.config.params import load_params

TINY_CONFIG = {
    "model": None,  # set per session: the tiny model's folder
    "layers_note": "tiny test model",
    "stats": {"corpus": None, "tokens": 3000, "seq_len": 32, "batch_size": 8},
    "values": {"steps": 8, "early_stop_nll": 0.5},
    "nas": {"pilots": 4, "pilot_batch_size": 4},
    "memit": {"layers": [0, 1], "mom2_weight": 10.0},
    "alphaedit": {"layers": [0, 1]},
    "rome": {"layers": [1]},
}


def write_batch(path: Path, records: list[dict], extra_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(x + "\n" for x in extra_lines),
                    encoding="utf-8")
    return path


def record(case_id: str, subject: str, /, **fields) -> dict:
    """A valid fact record; ``fields`` override or (with value None) remove keys."""
    out = {
        "case_id": case_id,
        "prompt": "The {} is located in the city of",
        "subject": subject,
        "target_new": "Rome",
        "target_true": "Paris",
        "relation_id": "P131",
    }
    for key, value in fields.items():
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tok):
    from tiny import CORPUS, tiny_model

    root = tmp_path_factory.mktemp("tiny-refresh")
    folder = root / "tiny-llama"
    model = tiny_model("llama")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(CORPUS * 60), encoding="utf-8")
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["model"] = str(folder)
    cfg["stats"]["corpus"] = str(corpus)
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    # The same model with the brakes off: huge value shifts, no early stop, weak regularisation.
    cfg["values"] = {"steps": 20, "lr": 5.0, "clamp_norm_factor": 100.0, "early_stop_nll": 0.0, "weight_decay": 0.0}
    cfg["memit"] = {"layers": [0, 1], "mom2_weight": 0.01}
    (root / "tiny-aggressive.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return root


def make_params(tiny_folder: Path, work: Path, tracking_uri: str, **overrides) -> Path:
    cache = tiny_folder / "cache"
    doc = {
        "model": str(tiny_folder / "tiny.yaml"),
        # MEMIT: AlphaEdit's absolute null-space threshold (0.02) leaves no free directions in the
        # tiny model's covariance, so its updates there are ~0 (SmolLM2 keeps 88%).
        "edit": {"method": "memit", "nas": True, "batch_size": 3},
        "paths": {"inbox": str(work / "inbox"), "accepted": str(work / "accepted"),
                  "quarantine": str(work / "quarantine"), "checkpoints": str(work / "checkpoints"),
                  "ledger": str(work / "ledger.jsonl"), "reports": str(work / "reports"),
                  "models": str(cache / "models"), "stats": str(cache / "stats"), "anchors": str(cache / "anchors"),
                  "eval_cache": str(cache / "eval")},
        "promotion": {"min_batch_efficacy": 0.0, "min_batch_generalisation": 0.0, "min_batch_specificity": 0.0,
                      "min_retention_efficacy": 0.0, "max_norm_growth_per_edit": 1.0, "max_skipped_fraction": 1.0},
        "eval": {"general_tasks": [], "canary_tokens": 128, "canary_window": 32, "fluency_prompts": 0},
        "collapse": {"min_editing_score": 0.0, "max_perplexity_ratio": 1000.0, "max_norm_ratio": 100.0},
        "tracking": {"uri": tracking_uri, "experiment": f"refresh-{work.name}"},
    }
    for section, values in overrides.items():
        doc[section] = {**doc.get(section, {}), **values} if isinstance(values, dict) else values
    path = work / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def night(prefect, tiny_folder, tracking_uri, tmp_path, monkeypatch):
    """Run one nightly flow with params for this test: ``night(**overrides) -> (outcomes, params)``."""
    from flows.refresh.flow import nightly_refresh

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def run(**overrides):
        params_file = make_params(tiny_folder, tmp_path, tracking_uri, **overrides)
        return nightly_refresh(str(params_file)), load_params(params_file)

    return run


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
