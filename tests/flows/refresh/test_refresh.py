"""The nightly refresh flow end to end on a tiny model: promote, quarantine, reject, rollback, re-runs.

One Prefect test harness serves the whole session (it takes seconds to start); every test
has its own inbox, ledger, checkpoints and registered model, and shares the tiny model's
statistics/anchor caches with the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nights import write_batch
from tiny import FACTS, fact

from flows.ledger.records import Ledger


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
    # The reviewer's view: the batch as dataset input, one table row per fact, a one-sentence verdict.
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "night-02" and ds.dataset.digest == promos[1]["file_sha256"][:32]
    assert run.data.tags["mlflow.note.content"].startswith("night-02 was promoted as v0002: ")
    table = json.loads(Path(tracker.client.download_artifacts(run.info.run_id, "facts.json",
                                                              str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["case_id"] for r in rows] == [fact(*f)["case_id"] for f in FACTS[3:]]
    assert all(set(r) >= {"prompt", "target_true", "target_new", "answer_before", "answer_after", "p_new_after",
                          "p_true_after", "passed"} for r in rows)
    assert all(r["passed"] == (r["p_new_after"] > r["p_true_after"] and not r["skipped_by_nas"]) for r in rows)


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
    from flows.cli.night import _outcome_rows

    run = mlflow_champion(params)[0].client.get_run(ledger.entries()[-1]["mlflow_run_id"])
    assert run.data.tags["verdict"] == "quarantined" and "failed.validation_malformed_json" in run.data.tags
    assert run.data.tags["mlflow.note.content"].startswith("b-bad was quarantined at validation (")
    rows = _outcome_rows(params, outcomes)  # what `nas refresh` prints (and --json gives)
    assert rows[0]["version"] == "v0001" and rows[0]["details"].startswith("editing score ")
    assert "problems: " in rows[1]["details"] and "template_placeholder_count" in rows[1]["details"]


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
    assert "was rejected by the gate" in run.data.tags["mlflow.note.content"]
    assert "the champion stays v0001" in run.data.tags["mlflow.note.content"]
    table = json.loads(Path(tracker.client.download_artifacts(run.info.run_id, "facts.json",
                                                              str(tmp_path))).read_text())
    failed_col = table["columns"].index("night_failed_checks")
    assert all("norm_growth_per_edit" in row[failed_col] for row in table["data"])
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


def test_a_worker_on_another_machine_is_kept_out_by_the_model_s_prefect_slot(night, tmp_path, tiny_folder):
    """The file lock cannot see another machine; the Prefect server's global concurrency slot of the
    model can: while another worker holds it (here a thread talking to the same server), a night of
    that model refuses to edit, a night of another model is not held up, and it runs once freed."""
    import threading

    from flows.refresh.lock import RefreshLocked, model_slot, slot_name

    write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    model = str(tiny_folder / "tiny.yaml")  # the night's params.yaml model
    held, release = threading.Event(), threading.Event()

    def other_worker():
        with model_slot(model):
            held.set()
            release.wait(60)

    worker = threading.Thread(target=other_worker)
    worker.start()
    try:
        assert held.wait(60)
        with pytest.raises(RefreshLocked, match="holds the Prefect concurrency slot"):
            night(lock={"prefect_slot": True})
        assert (tmp_path / "inbox" / "night-01.jsonl").exists() and not (tmp_path / "ledger.jsonl").exists()
        with model_slot(model + "-other") as other:  # another model's slot is free
            assert other != slot_name(model)
    finally:
        release.set()
        worker.join(60)
    outcomes, _ = night(lock={"prefect_slot": True})
    assert [o.outcome for o in outcomes] == ["promoted"]
