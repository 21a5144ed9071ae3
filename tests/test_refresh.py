"""The nightly refresh flow end to end on a tiny model: promote, quarantine, reject, rollback, re-runs.

One Prefect test harness serves the whole session (it takes seconds to start); every test
has its own inbox, ledger, checkpoints and registered model, and shares the tiny model's
statistics/anchor caches with the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import FACTS, fact

from flows.config.params import load_params
from flows.ledger.records import Ledger

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
        doc[section] = {**doc[section], **values} if isinstance(values, dict) else values
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


def champion_hash(params) -> str | None:
    champ = Ledger(params.roots.ledger).champion()
    return None if champ is None else champ["weights_hash"]


def mlflow_champion(params):
    from flows.tracking.names import registered_model_name
    from flows.tracking.tracker import Tracker

    tracker = Tracker(params.tracking.uri, params.tracking.experiment)
    return tracker, tracker.champion(registered_model_name("local--tiny-llama"))


def test_good_batches_are_promoted_in_order(night, tmp_path):
    write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*f) for f in FACTS[:3]])
    write_batch(tmp_path / "inbox" / "night-02.jsonl", [fact(*f) for f in FACTS[3:]])
    outcomes, params = night()
    assert [o.outcome for o in outcomes] == ["promoted", "promoted"]
    assert [o.version for o in outcomes] == ["v0001", "v0002"]
    ledger = Ledger(params.roots.ledger)
    promos = ledger.promotions()
    assert [p["parent"] for p in promos] == [None, "v0001"]
    assert promos[1]["edits_so_far"] == 6 and len(promos[1]["request_ids"]) == 3 - len(promos[1]["skipped_ids"])
    assert sorted(p.name for p in (tmp_path / "accepted").iterdir()) == ["night-01.jsonl", "night-02.jsonl"]
    assert not list((tmp_path / "inbox").iterdir())
    manifest = json.loads((tmp_path / "checkpoints" / "v0002" / "manifest.json").read_text())
    assert manifest["weights_hash"] == promos[1]["weights_hash"] == outcomes[1].weights_hash
    assert (tmp_path / "reports").is_dir() and list((tmp_path / "reports").glob("night-02-*/validation.html"))
    tracker, champ = mlflow_champion(params)
    assert champ is not None and champ.version_label == "v0002"
    run = tracker.client.get_run(promos[1]["mlflow_run_id"])
    assert run.data.tags["verdict"] == "promoted" and "retention.efficacy_success" in run.data.metrics
    assert run.data.params["batch_sha256"] == promos[1]["file_sha256"]


def test_bad_batch_is_quarantined_untouched_and_champion_kept(night, tmp_path):
    good = write_batch(tmp_path / "inbox" / "a-good.jsonl", [fact(*FACTS[0])])
    bad = write_batch(tmp_path / "inbox" / "b-bad.jsonl", [fact(*FACTS[1]), {**fact(*FACTS[2]), "prompt": "no slot"}],
                      ['{"case_id": "broken",'])
    bad_bytes = bad.read_bytes()
    del good
    outcomes, params = night()
    assert [o.outcome for o in outcomes] == ["promoted", "quarantined"]
    folder = Path(outcomes[1].folder)
    assert (folder / "b-bad.jsonl").read_bytes() == bad_bytes
    reason = json.loads((folder / "reason.json").read_text())
    assert reason["reason"]["stage"] == "validation"
    assert set(reason["reason"]["problems"]) >= {"template_placeholder_count", "malformed_json"}
    html = (folder / "validation.html").read_text()
    assert "template_placeholder_count" in html and "malformed_json" in html
    ledger = Ledger(params.roots.ledger)
    assert [e["event"] for e in ledger.entries()] == ["promote", "quarantine"]
    assert ledger.champion()["version"] == "v0001"


def test_gate_rejects_a_collapsing_batch_and_keeps_the_champion_weights(night, tmp_path, tiny_folder):
    write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*f) for f in FACTS[:3]])
    outcomes, params = night()
    before = champion_hash(params)
    assert outcomes[0].outcome == "promoted"
    # NAS off with aggressive value settings blows the edited weights up: the gate must reject it.
    write_batch(tmp_path / "inbox" / "night-02.jsonl", [fact(*f) for f in FACTS[3:]])
    outcomes, params = night(model=str(tiny_folder / "tiny-aggressive.yaml"), edit={"nas": False},
                             collapse={"max_norm_ratio": 1.5}, promotion={"max_norm_growth_per_edit": 0.01})
    assert outcomes[0].outcome == "rejected", outcomes
    assert {"norm_ratio", "norm_growth_per_edit"} & set(outcomes[0].failed_checks)
    assert champion_hash(params) == before
    assert not (tmp_path / "checkpoints" / "v0002").exists()
    reason = json.loads((Path(outcomes[0].folder) / "reason.json").read_text())
    assert reason["reason"]["stage"] == "gate"
    tracker, champ = mlflow_champion(params)
    assert champ.version_label == "v0001"
    entry = Ledger(params.roots.ledger).entries()[-1]
    assert entry["event"] == "reject"
    run = tracker.client.get_run(entry["mlflow_run_id"])
    assert run.data.tags["verdict"] == "rejected" and "norm_growth_per_edit" in run.data.tags["failed_checks"]
    # The next night edits the unchanged champion: the rejected edits left no trace.
    write_batch(tmp_path / "inbox" / "night-03.jsonl", [fact(*FACTS[3])])
    outcomes, params = night()
    promo = Ledger(params.roots.ledger).promotions()[-1]
    assert promo["parent"] == "v0001" and promo["edits_so_far"] == 4


def test_rollback_and_manual_promote_move_the_champion(night, tmp_path):
    from flows.refresh.operations import move_champion, status

    write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    write_batch(tmp_path / "inbox" / "night-02.jsonl", [fact(*FACTS[1])])
    _, params = night()
    tracker, _ = mlflow_champion(params)
    move_champion(params, "v0001", "rollback", "bad answers reported", tracker)
    assert status(params)["champion"] == "v0001"
    assert mlflow_champion(params)[1].version_label == "v0001"
    with pytest.raises(ValueError, match="never promoted"):
        move_champion(params, "v0009", "rollback", "typo", tracker)
    with pytest.raises(ValueError, match="already the champion"):
        move_champion(params, "v0001", "rollback", "again", tracker)
    write_batch(tmp_path / "inbox" / "night-03.jsonl", [fact(*FACTS[2])])
    outcomes, params = night()
    promo = Ledger(params.roots.ledger).promotions()[-1]
    assert outcomes[0].version == "v0003" and promo["parent"] == "v0001" and promo["edits_so_far"] == 2
    move_champion(params, "v0002", "manual_promote", "roll forward", tracker)
    events = [e["event"] for e in Ledger(params.roots.ledger).entries()]
    assert events == ["promote", "promote", "rollback", "promote", "manual_promote"]
    assert status(params)["champion"] == "v0002"


def test_rerunning_a_night_never_applies_a_batch_twice(night, tmp_path):
    batch = [fact(*f) for f in FACTS[:2]]
    write_batch(tmp_path / "inbox" / "night-01.jsonl", batch)
    outcomes, params = night()
    assert outcomes[0].outcome == "promoted"
    assert night()[0] == []  # empty inbox: nothing to do
    # The same file delivered again (e.g. a crash before it was moved): recognised by its hash.
    write_batch(tmp_path / "inbox" / "night-01-again.jsonl", batch)
    outcomes, params = night()
    assert outcomes[0].outcome == "already_applied"
    assert len(Ledger(params.roots.ledger).promotions()) == 1
    assert not list((tmp_path / "inbox").iterdir())


def test_a_second_refresh_does_not_run_while_one_holds_the_lock(night, tmp_path):
    from flows.refresh.lock import RefreshLocked, refresh_lock

    write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    with refresh_lock(tmp_path / ".refresh.lock"):
        with pytest.raises(RefreshLocked, match="another refresh is running"):
            night()
    assert (tmp_path / "inbox" / "night-01.jsonl").exists()
    assert not (tmp_path / "ledger.jsonl").exists()
