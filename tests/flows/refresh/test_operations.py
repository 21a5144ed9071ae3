"""Operator functions that run without a night: the demo-night loop, the project's tracker."""

from __future__ import annotations

from nights import make_params, write_batch
from tiny import FACTS, fact

from flows.config.params import load_params
from flows.refresh import operations


def test_refresh_nights_stages_each_demo_night_before_its_run(tmp_path):
    params_file = make_params(tmp_path, tmp_path / "work", "sqlite:///unused.db")
    params = load_params(params_file)
    nights = [write_batch(tmp_path / "demo" / f"night-0{i}.jsonl", [fact(*FACTS[i])]) for i in (1, 2)]
    staged, runs = [], []

    def run(params_arg, project):
        runs.append((params_arg, project, sorted(p.name for p in params.roots.inbox.iterdir())))
        return [f"outcome-{len(runs)}"]

    outcomes = operations.refresh_nights(params, params_file, nights, lambda n, s: staged.append((n, s)), run)
    assert outcomes == ["outcome-1", "outcome-2"]
    assert staged == [(n, params.roots.inbox / n.name) for n in nights]
    assert runs == [(str(params_file.resolve()), str(params.root), ["night-01.jsonl"]),
                    (str(params_file.resolve()), str(params.root), ["night-01.jsonl", "night-02.jsonl"])]
    assert all(n.is_file() for n in nights)  # copies: the shipped files stay


def test_refresh_nights_without_nights_is_one_run_over_the_inbox(tmp_path):
    params = load_params(make_params(tmp_path, tmp_path / "work", "sqlite:///unused.db"))
    runs = []
    assert operations.refresh_nights(params, None, None, run=lambda *a: runs.append(a) or []) == []
    assert runs == [(None, str(params.root))]


def test_open_tracker_uses_the_projects_store_and_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = operations.open_tracker(load_params(make_params(tmp_path, tmp_path / "work", uri)))
    assert (tracker.tracking_uri, tracker.experiment_name) == (uri, "refresh-work")
