"""Pulling the night's batches from configured sources (flows/facts/pull.py) and a night that does."""

from __future__ import annotations

import json

import pytest
from nights import write_batch
from tiny import FACTS, fact

from flows.config.params import SourceParams
from flows.facts import pull
from flows.ledger.records import Ledger


def source(folder, **kw) -> SourceParams:
    return SourceParams(name="team", url=f"file://{folder}", **{"retry_delay_s": 0.0, **kw})


def test_new_files_are_pulled_once_with_their_provenance(tmp_path):
    remote, inbox, ledger = tmp_path / "remote", tmp_path / "inbox", Ledger(tmp_path / "ledger.jsonl")
    write_batch(remote / "night-01.jsonl", [fact(*FACTS[0])])
    write_batch(remote / "sub" / "night-02.jsonl", [fact(*FACTS[1])])
    (remote / "notes.txt").write_text("not a batch", encoding="utf-8")
    got = pull.pull_source(source(remote), inbox, ledger, 1 << 20)
    assert [(p.path, p.inbox_name) for p in got] == [("night-01.jsonl", "night-01.jsonl"),
                                                    ("sub/night-02.jsonl", "night-02.jsonl")]
    assert (inbox / "night-01.jsonl").read_bytes() == (remote / "night-01.jsonl").read_bytes()
    lines = [e for e in ledger.entries() if e["event"] == "pull"]
    assert [e["path"] for e in lines] == ["night-01.jsonl", "sub/night-02.jsonl"]
    assert all(e["source"] == "team" and e["revision"].startswith("mtime:") and e["url"].startswith("file://")
               and len(e["file_sha256"]) == 64 for e in lines)
    # A second night pulls nothing; new bytes under a known name are a new batch, under a free name.
    assert pull.pull_source(source(remote), inbox, ledger, 1 << 20) == []
    write_batch(remote / "night-01.jsonl", [fact(*FACTS[2])])
    (again,) = pull.pull_source(source(remote), inbox, ledger, 1 << 20)
    assert again.inbox_name == "night-01-2.jsonl" and json.loads((inbox / again.inbox_name).read_text())[
        "case_id"] == fact(*FACTS[2])["case_id"]


def test_a_batch_the_ledger_already_has_is_not_pulled_again(tmp_path):
    remote, inbox, ledger = tmp_path / "remote", tmp_path / "inbox", Ledger(tmp_path / "ledger.jsonl")
    write_batch(remote / "a.jsonl", [fact(*FACTS[0])])
    pull.pull_source(source(remote), inbox, ledger, 1 << 20)
    (remote / "copy.jsonl").write_bytes((remote / "a.jsonl").read_bytes())
    assert pull.pull_source(source(remote), inbox, ledger, 1 << 20) == []
    assert sorted(p.name for p in inbox.iterdir()) == ["a.jsonl"]


def test_a_source_that_stays_down_stops_the_night_after_its_retries(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    calls = []

    def down(self, *args, **kwargs):
        calls.append(1)
        raise ConnectionError("connection refused")

    monkeypatch.setattr(local.LocalFileSystem, "find", down)
    with pytest.raises(pull.SourceUnavailable, match="listing failed 3 times.*nothing was edited"):
        pull.pull_source(source(tmp_path, retries=2), tmp_path / "inbox", Ledger(tmp_path / "l.jsonl"), 1 << 20)
    assert len(calls) == 3 and not (tmp_path / "inbox").exists()


def test_a_night_pulls_its_batches_from_a_folder_and_a_datasets_source_and_promotes_them(night, tmp_path):
    remote, folder = tmp_path / "remote", tmp_path / "facts-ds"
    write_batch(remote / "night-01.jsonl", [fact(*f) for f in FACTS[:2]])
    write_batch(folder / "train.jsonl", [fact(*f) for f in FACTS[2:4]])
    sources = [{"name": "team", "url": f"file://{remote}"}, {"name": "ds", "url": str(folder), "kind": "datasets"}]
    outcomes, params = night(sources=sources)
    assert [o.outcome for o in outcomes] == ["promoted", "promoted"]
    assert sorted(o.batch[:3] for o in outcomes) == ["ds-", "nig"]  # inbox name order
    events = [e["event"] for e in Ledger(params.roots.ledger).entries()]
    assert events == ["pull", "pull", "promote", "promote"]
    outcomes, _ = night(sources=sources)
    assert outcomes == []  # nothing new at either source, nothing in the inbox


def test_a_datasets_folder_is_pulled_as_one_batch_of_fact_records(tmp_path):
    folder, inbox, ledger = tmp_path / "facts-ds", tmp_path / "inbox", Ledger(tmp_path / "ledger.jsonl")
    write_batch(folder / "train.jsonl", [fact(*f) for f in FACTS[:3]])
    src = SourceParams(name="ds", url=str(folder), kind="datasets", retry_delay_s=0.0)
    (got,) = pull.pull_source(src, inbox, ledger, 1 << 20)
    assert got.inbox_name.startswith("ds-") and got.path == "train"
    rows = [json.loads(line) for line in (inbox / got.inbox_name).read_text().splitlines()]
    assert [r["case_id"] for r in rows] == [fact(*f)["case_id"] for f in FACTS[:3]]
    (line,) = [e for e in ledger.entries() if e["event"] == "pull"]
    assert line["revision"].startswith("fingerprint:") and line["source"] == "ds"
    assert pull.pull_source(src, inbox, ledger, 1 << 20) == []  # the same dataset is never pulled twice
