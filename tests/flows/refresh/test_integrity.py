"""Integrity of what a night reads and writes (issue 12): the bytes edited are the bytes recorded,
only regular *.jsonl files are batches, tampered checkpoints and ledger lines are refused by every
reader, damage is reported instead of crashing, reports stay bounded, sizes are checked before
anything is held in memory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from nights import make_params, write_batch
from safetensors.torch import load_file, save_file
from tiny import FACTS, fact
from typer.testing import CliRunner

from flows.config.params import load_params
from flows.config.validation import ValidationSettings
from flows.engine.checkpoints import CheckpointTampered
from flows.facts import inbox
from flows.facts.quarantine import quarantine
from flows.facts.rules import FLOW_RULE_SEVERITY
from flows.facts.validate import validate_batch
from flows.ledger.records import Ledger, LedgerDamaged, parse_entry
from flows.refresh import operations
from nas_core.formats import RULE_SEVERITY

DOCS = Path(__file__).resolve().parents[3] / "docs" / "FACT_SCHEMA.md"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the bytes edited are the bytes recorded ------------------------------------------------------

def test_a_batch_rewritten_mid_night_is_recorded_and_stored_as_edited(night, tmp_path, monkeypatch):
    import flows.refresh.steps as steps

    batch = write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    edited = batch.read_bytes()
    rewritten = json.dumps(fact(*FACTS[2])).encode() + b"\n"
    real_validate = steps.validate

    def validate_then_rewrite(*args, **kwargs):
        result = real_validate(*args, **kwargs)
        batch.write_bytes(rewritten)  # an upload overwrites the file after validation, before the move
        return result

    monkeypatch.setattr(steps, "validate", validate_then_rewrite)
    outcomes, params = night()
    assert [o.outcome for o in outcomes] == ["promoted"]
    entry = Ledger(params.roots.ledger).champion()
    accepted = (tmp_path / "accepted" / "night-01.jsonl").read_bytes()
    assert entry["file_sha256"] == sha(accepted) == sha(edited)
    assert entry["request_ids"] == [FACTS[0][0]]
    assert batch.read_bytes() == rewritten  # the new content is not lost: it waits as the next batch


def test_a_symlinked_batch_is_kept_as_bytes_and_the_report_says_where_it_pointed(tmp_path):
    target = tmp_path / "elsewhere" / "batch.jsonl"
    target.parent.mkdir()
    target.write_bytes(b'{"case_id": "x"}\n')
    link = tmp_path / "inbox" / "night-02.jsonl"
    link.parent.mkdir()
    link.symlink_to(target)
    folder = quarantine(link, None, tmp_path / "quarantine", {"stage": "test"})
    kept = folder / "night-02.jsonl"
    assert not kept.is_symlink() and kept.read_bytes() == b'{"case_id": "x"}\n'
    assert json.loads((folder / "reason.json").read_text())["symlink_target"] == str(target)
    target.write_bytes(b"changed later\n")
    assert kept.read_bytes() == b'{"case_id": "x"}\n'  # the evidence does not follow its old target
    assert not os.path.lexists(link) and target.exists()  # the link is gone, its target is not ours


def test_only_complete_regular_jsonl_files_are_batches(tmp_path):
    box = tmp_path / "inbox"
    box.mkdir()
    for name in ("night-05.jsonl", "night-05.jsonl.part", "b.tmp", "notes.txt", ".hidden.jsonl"):
        (box / name).write_text("{}\n")
    (box / "dir.jsonl").mkdir()
    os.mkfifo(box / "fifo.jsonl")
    (box / "dangling.jsonl").symlink_to(tmp_path / "nowhere")
    (box / "link.jsonl").symlink_to(box / "night-05.jsonl")
    scan = inbox.scan_inbox(box)
    assert [p.name for p in scan.batches] == ["link.jsonl", "night-05.jsonl"]
    why = {i.name: i.why for i in scan.ignored}
    assert set(why) == {"night-05.jsonl.part", "b.tmp", "notes.txt", ".hidden.jsonl", "dir.jsonl", "fifo.jsonl",
                        "dangling.jsonl"}
    assert why["fifo.jsonl"] == "a FIFO" and why["dir.jsonl"] == "a directory"
    with pytest.raises(inbox.NotARegularFile):  # swapped for a FIFO after the scan: refused, never blocks
        inbox.take_snapshot(box / "fifo.jsonl", 100)


def test_the_night_leaves_what_is_not_a_batch_alone_and_status_lists_it(night, tmp_path):
    box = tmp_path / "inbox"
    write_batch(box / "night-01.jsonl", [fact(*FACTS[0])])
    (box / "night-02.jsonl.part").write_text("half an upload")
    (box / "x.jsonl").mkdir()
    outcomes, params = night()
    assert [o.batch for o in outcomes] == ["night-01"]
    assert (box / "night-02.jsonl.part").read_text() == "half an upload" and (box / "x.jsonl").is_dir()
    status = operations.status(params)
    assert {i["name"] for i in status["inbox_ignored"]} == {"night-02.jsonl.part", "x.jsonl"}


def test_a_large_file_is_hashed_in_chunks_and_never_held(tmp_path):
    big = tmp_path / "big.jsonl"
    with big.open("wb") as f:  # sparse: 64 MiB on paper, nothing on disk
        f.truncate(64 * 2**20)
    snap = inbox.take_snapshot(big, 2**20)
    assert snap.data is None and snap.size == 64 * 2**20
    assert snap.sha256 == hashlib.sha256(bytes(64 * 2**20)).hexdigest()
    v = validate_batch(snap, None, (), ValidationSettings(max_file_bytes=2**20))
    assert [p.rule for p in v.problems] == ["file_too_large"]
    folder = quarantine(snap, v, tmp_path / "quarantine", {"stage": "validation"})
    assert (folder / "big.jsonl").stat().st_size == 64 * 2**20 and not big.exists()


# --- tampering is caught --------------------------------------------------------------------------

# What each kind of tampering needs: the compact format's increment, or a snapshot's files.
SNAPSHOT_KINDS = {"state", "deltas"}


def two_nights(night, tmp_path, kind="increment"):
    every = {"checkpoints": {"snapshot_every": 1 if kind in SNAPSHOT_KINDS else 30}}
    write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    night(**every)
    write_batch(tmp_path / "inbox" / "night-02.jsonl", [fact(*FACTS[1])])
    outcomes, params = night(**every)
    assert [o.outcome for o in outcomes] == ["promoted"]
    return params


def tamper(kind: str, params, version: str) -> str:
    """Alter one thing of ``version``; returns the file name the refusal must name."""
    ckpt = params.roots.checkpoints / version
    if kind == "increment":  # one factor of the night's update
        inc = load_file(ckpt / "increment.safetensors")
        name = next(k for k in inc if k.endswith("/right"))
        inc[name] = inc[name] * 1.001
        save_file(inc, ckpt / "increment.safetensors")
        return "increment.safetensors"
    if kind == "state":  # the NAS reference norm, 5x
        state = load_file(ckpt / "state.safetensors")
        key = next(k for k in state if "reference_norm" in k)
        state[key] = state[key] * 5
        save_file(state, ckpt / "state.safetensors")
        return "state.safetensors"
    if kind == "deltas":
        deltas = load_file(ckpt / "deltas.safetensors")
        name = next(iter(deltas))
        deltas[name] = deltas[name] + torch.ones_like(deltas[name]) * 1e-3
        save_file(deltas, ckpt / "deltas.safetensors")
        return "deltas.safetensors"
    if kind == "manifest":  # the NAS reference norm a compact lineage starts from, 5x
        man = json.loads((ckpt / "manifest.json").read_text())
        man["reference_norm"] = 500.0
        (ckpt / "manifest.json").write_text(json.dumps(man))
        return "manifest.json"
    ledger = params.roots.ledger  # the ledger line: its recorded state hash
    lines = ledger.read_text().splitlines()
    for i, line in enumerate(lines):
        entry = json.loads(line)
        if entry.get("version") == version and entry["event"] == "promote":
            entry["files"]["increment.safetensors"] = "0" * 64
            lines[i] = json.dumps(entry)
    ledger.write_text("\n".join(lines) + "\n")
    return "increment.safetensors"


def assert_one_line(message: str, name: str) -> None:
    assert "\n" not in message and name in message and message.count("hashes to") == 1 and "recorded" in message


@pytest.mark.parametrize("kind", ["increment", "state", "deltas", "manifest", "ledger"])
def test_a_tampered_champion_is_refused_by_load_status_and_audit(night, tmp_path, kind):
    params = two_nights(night, tmp_path, kind)
    name = tamper(kind, params, "v0002")
    write_batch(tmp_path / "inbox" / "night-03.jsonl", [fact(*FACTS[2])])
    with pytest.raises(CheckpointTampered) as err:  # loading: the next night
        night(checkpoints={"snapshot_every": 1 if kind in SNAPSHOT_KINDS else 30})
    assert (tmp_path / "inbox" / "night-03.jsonl").is_file()  # nothing was edited or moved
    assert_one_line(str(err.value), name)
    status = operations.status(params)
    assert len(status["integrity"]) == 1
    assert_one_line(status["integrity"][0], name)
    from flows.cli.app import app

    params_file = next(tmp_path.glob("params*.yaml"))
    res = CliRunner().invoke(app, ["audit", "--params", str(params_file)])
    assert res.exit_code == 1 and "refused" in res.output and name in res.output


@pytest.mark.parametrize("kind", ["increment", "state", "deltas", "manifest", "ledger"])
def test_a_tampered_version_is_refused_by_rollback_and_promote(night, tmp_path, kind):
    params = two_nights(night, tmp_path, kind)
    name = tamper(kind, params, "v0001")
    for event in ("rollback", "manual_promote"):
        with pytest.raises(CheckpointTampered) as err:
            operations.move_champion(params, "v0001", event, "test")
        assert_one_line(str(err.value), name)
    assert Ledger(params.roots.ledger).champion()["version"] == "v0002"
    champion = operations.status(params)["integrity"]
    if kind in SNAPSHOT_KINDS or kind == "ledger":
        assert champion == []  # the champion is a snapshot, or its chain's files are intact
    else:  # a compact champion is rebuilt through v0001: its chain is refused, naming v0001's file
        assert len(champion) == 1 and "v0001" in champion[0] and name in champion[0]
    assert len(operations.status(params, verify=True)["integrity"]) == 1  # --verify: the whole lineage


# --- damage is reported, not a crash --------------------------------------------------------------

@pytest.mark.parametrize(("line", "fault"), [
    ("{}", "'event' is None"),
    ("[1]", "expected a JSON object"),
    ('{"event": "promote", "batch_id": "b"}', "needs 'version'"),
    ('{"event": "rollback", "version": 7}', "must be a version"),
])
def test_a_damaged_ledger_line_is_named_by_status_and_refused_by_the_night(night, tmp_path, line, fault):
    write_batch(tmp_path / "inbox" / "night-01.jsonl", [fact(*FACTS[0])])
    _, params = night()
    ledger = params.roots.ledger
    ledger.write_text(ledger.read_text() + line + "\n" + ledger.read_text())
    status = operations.status(params)
    assert len(status["ledger_damage"]) == 1 and "line 2" in status["ledger_damage"][0]
    assert fault in status["ledger_damage"][0]
    write_batch(tmp_path / "inbox" / "night-02.jsonl", [fact(*FACTS[1])])
    with pytest.raises(LedgerDamaged, match="line 2"):
        night()


def test_appending_refuses_to_write_a_damaged_entry(tmp_path):
    with pytest.raises(LedgerDamaged):
        Ledger(tmp_path / "ledger.jsonl").append("promote", batch_id="b")
    assert not (tmp_path / "ledger.jsonl").exists()
    assert parse_entry({"event": "quarantine", "batch_id": "b", "file_sha256": "a" * 64}, 1).event == "quarantine"


# --- bounded reports, severities documented -------------------------------------------------------

def test_reports_are_bounded_per_rule(tmp_path, tok):
    record = fact(*FACTS[0])
    record.update({f"k{i}": i for i in range(5000)})
    path = tmp_path / "many.jsonl"
    path.write_text(json.dumps(record) + "\n")
    v = validate_batch(path, tok, (), ValidationSettings(max_problems_per_rule=50))
    assert len([p for p in v.problems if p.rule == "unknown_field"]) == 50
    assert v.omitted["unknown_field"] == 4950 and v.problems_by_rule()["unknown_field"] == 5000
    assert len(json.dumps(v.to_dict())) < 100_000


def test_every_rule_is_documented_with_its_severity():
    text = DOCS.read_text(encoding="utf-8")
    for rule, severity in {**RULE_SEVERITY, **FLOW_RULE_SEVERITY}.items():
        assert f"| `{rule}` | {severity} |" in text, rule


# --- nas validate ---------------------------------------------------------------------------------

def test_nas_validate_runs_the_nights_checks_without_moving_anything(tiny_folder, tmp_path, tracking_uri):
    from flows.cli.app import app

    params_file = make_params(tiny_folder, tmp_path, tracking_uri)
    good = write_batch(tmp_path / "good.jsonl", [fact(*FACTS[0])])
    bad = write_batch(tmp_path / "bad.jsonl", [fact(*FACTS[0])], ['{"case_id": "x"}'])
    res = CliRunner().invoke(app, ["validate", str(good), "--params", str(params_file)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["validate", str(good), str(bad), "--params", str(params_file), "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert [d["passed"] for d in doc] == [True, False]
    assert {(p["line"], p["rule"], p["severity"]) for p in doc[1]["problems"]} >= {(2, "missing_field", "record")}
    assert good.is_file() and bad.is_file() and not (tmp_path / "quarantine").exists()
    assert load_params(params_file).validation.max_problems_per_rule == 50


def test_check_files_checks_each_file_in_order_and_stops_at_one_that_is_not_a_file(tiny_folder, tmp_path,
                                                                                   tracking_uri, tok):
    from flows.refresh.steps import NotABatchFile, check_files

    params = load_params(make_params(tiny_folder, tmp_path, tracking_uri))
    good = write_batch(tmp_path / "good.jsonl", [fact(*FACTS[0])])
    bad = write_batch(tmp_path / "bad.jsonl", [fact(*FACTS[0])], ['{"case_id": "x"}'])
    results = check_files([good, bad], params, tok)
    assert [(r.path, r.passed, r.n_records) for r in results] == [(good, True, 1), (bad, False, 2)]
    with pytest.raises(NotABatchFile, match="absent.jsonl: not a file") as err:
        check_files([good, tmp_path / "absent.jsonl", bad], params, tok)
    assert err.value.path == tmp_path / "absent.jsonl"


def test_a_torn_last_line_is_set_aside_and_the_ledger_stays_readable(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append("quarantine", batch_id="a", file_sha256="a" * 64)
    with ledger.path.open("ab") as f:
        f.write(b'{"event": "promote", "vers')  # a crash in the middle of an append
    assert len(ledger.entries()) == 1  # the torn tail is ignored while it is last
    ledger.append("quarantine", batch_id="b", file_sha256="b" * 64)
    assert [e["batch_id"] for e in ledger.entries()] == ["a", "b"]  # and never becomes damage
    (aside,) = tmp_path.glob("ledger.jsonl.torn-*")
    assert aside.read_bytes() == b'{"event": "promote", "vers'
