"""The project directory is the working one (or --project / $NAS_PROJECT), never the package's location."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.config.model import ConfigError
from flows.config.params import load_params
from flows.paths import ENV_PROJECT, Paths, project_root
from flows.tracking.uris import resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clone(tmp_path, monkeypatch) -> Path:
    """A second project folder with its own params.yaml, demo batch and model configs."""
    monkeypatch.setenv(ENV_PROJECT, "")  # recorded: whatever `nas --project` sets is undone afterwards
    monkeypatch.delenv(ENV_PROJECT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    other = tmp_path / "other-clone"
    (other / "data" / "demo" / "batches").mkdir(parents=True)
    (other / "configs").mkdir()
    (other / "configs" / "smollm2-135m.yaml").write_text((REPO / "configs" / "smollm2-135m.yaml").read_text())
    (other / "params.yaml").write_text("model: smollm2-135m\n", encoding="utf-8")
    (other / "data" / "demo" / "batches" / "night-01.jsonl").write_text("{}\n", encoding="utf-8")
    return other


def test_the_root_is_explicit_then_the_environment_then_the_working_directory(clone, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path.resolve()
    monkeypatch.setenv(ENV_PROJECT, str(clone))
    assert project_root() == clone.resolve()
    assert project_root(REPO) == REPO
    with pytest.raises(NotADirectoryError, match="does not exist"):
        project_root(tmp_path / "absent")


def test_every_folder_of_a_second_clone_stays_in_that_clone(clone, monkeypatch):
    from flows.refresh import operations

    monkeypatch.chdir(clone)
    params = load_params()
    assert params.root == clone.resolve()
    roots = params.roots
    for name in ("inbox", "accepted", "quarantine", "checkpoints", "ledger", "reports", "models", "stats",
                 "anchors", "eval_cache", "demo_batches"):
        assert getattr(roots, name).is_relative_to(clone), name
    assert roots.shared_data == clone / ".." / "shared" / "data" and roots.configs == clone / "configs"
    assert resolve_tracking_uri(params.tracking.uri or None, params.root) == f"sqlite:///{clone.resolve()}/mlflow.db"
    (night,) = operations.demo_nights(params)
    staged = operations.stage_demo_night(params, night)
    assert staged == clone.resolve() / "data" / "inbox" / "night-01.jsonl" and staged.is_file()


def test_absolute_paths_are_kept_and_relative_ones_follow_the_root(tmp_path):
    roots = Paths(ledger=str(tmp_path / "l.jsonl"), inbox="in").under(Path("/srv/project"))
    assert roots.ledger == tmp_path / "l.jsonl" and roots.inbox == Path("/srv/project/in")
    assert roots.relative(Path("/srv/project/data/accepted/a.jsonl")) == "data/accepted/a.jsonl"
    assert roots.relative(tmp_path / "x") == str(tmp_path / "x")
    assert roots.resolve("data/accepted/a.jsonl") == Path("/srv/project/data/accepted/a.jsonl")


def test_root_is_not_a_params_key(tmp_path):
    (tmp_path / "params.yaml").write_text("root: /elsewhere\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown keys \\['root'\\]"):
        load_params(project=tmp_path)


def test_the_cli_reads_the_chosen_projects_ledger(clone, tmp_path, monkeypatch):
    from flows.cli.app import app
    from flows.ledger.records import Ledger

    Ledger(clone / "data" / "ledger.jsonl").append("quarantine", batch_id="b1", file_sha256="0" * 64,
                                                   stage="validation", problems={"x": 1})
    monkeypatch.chdir(tmp_path)  # neither the repository nor the clone
    result = CliRunner().invoke(app, ["--project", str(clone), "status", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["ledger"] == str(clone.resolve() / "data" / "ledger.jsonl")
    assert [e["batch_id"] for e in doc["recent"]] == ["b1"]
