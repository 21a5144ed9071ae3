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


def test_a_night_pulls_its_batch_from_the_source_and_promotes_it(night, tmp_path):
    remote = tmp_path / "remote"
    write_batch(remote / "night-01.jsonl", [fact(*f) for f in FACTS[:2]])
    outcomes, params = night(sources=[{"name": "team", "url": f"file://{remote}"}])
    assert [(o.batch, o.outcome) for o in outcomes] == [("night-01", "promoted")]
    events = [e["event"] for e in Ledger(params.roots.ledger).entries()]
    assert events == ["pull", "promote"]
    outcomes, _ = night(sources=[{"name": "team", "url": f"file://{remote}"}])
    assert outcomes == []  # nothing new at the source, nothing in the inbox
