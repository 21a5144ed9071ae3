"""The nas console script: help, request-file detection, clear errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from flows.cli.editing import read_requests

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("fetch-model", "stats", "anchor", "edit", "export", "demo", "bench"):
        assert cmd in result.output


def _leaf_commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if getattr(cmd, "commands", None):
            yield from _leaf_commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_command_s_help_has_an_example():
    import typer

    commands = list(_leaf_commands(typer.main.get_command(app)))
    assert len(commands) >= 15 and ("bench", "horizon") in commands
    missing = [" ".join(c) for c in commands if "Example:" not in runner.invoke(app, [*c, "--help"]).output]
    assert not missing, f"no Example: in the --help of {missing}"


def test_version_names_the_package_and_the_commit():
    from flows.io import code_version
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("nas-edit 0.1.0 (commit ") and code_version() in result.output


def test_read_requests_detects_each_layout(tmp_path, shared_data):
    rome = read_requests(shared_data / "counterfact" / "counterfact_500.json", limit=3)
    easy = read_requests(shared_data / "counterfact" / "counterfact-val.json", limit=3)
    zsre = read_requests(shared_data / "zsre" / "zsre_mend_train-1k.json", limit=3)
    assert [len(x) for x in (rome, easy, zsre)] == [3, 3, 3]
    assert all("{}" in r.prompt for r in rome + easy + zsre)


def test_read_requests_fact_jsonl_reports_bad_records(tmp_path):
    good = {"case_id": "a1", "prompt": "{} is located in", "subject": "Angola", "target_new": "Asia",
            "target_true": "Africa"}
    bad = {**good, "case_id": "a2", "prompt": "is located in"}
    path = tmp_path / "batch.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n{not json\n")
    reqs = read_requests(path)
    assert [r.case_id for r in reqs] == ["a1"]


def test_edit_with_unknown_method_is_a_clear_error(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text("")
    result = runner.invoke(app, ["edit", "-r", str(path), "-o", str(tmp_path / "out"), "--method", "nope"])
    assert result.exit_code != 0
    assert result.exit_code == 2 and "unknown method" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "args", [["stats", "--model", "no-such-model"], ["anchor", "--model", "x", "--method", "rome"]]
)
def test_unknown_model_config_is_a_clear_error(args):
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "shipped configs" in result.output


def test_an_error_is_one_line_and_the_traceback_needs_debug(monkeypatch, capsys):
    import typer

    from flows.cli import app as app_module
    failing = typer.Typer()

    @failing.command()
    def night(debug: bool = typer.Option(False, "--debug")) -> None:
        raise FileNotFoundError("data/inbox/x.jsonl is missing: put the batch back\nsecond line")

    monkeypatch.setattr(app_module, "app", failing)
    monkeypatch.setattr("sys.argv", ["nas"])
    with pytest.raises(SystemExit) as stop:
        app_module.main()
    err = capsys.readouterr().err
    assert stop.value.code == 1
    assert "error: FileNotFoundError: data/inbox/x.jsonl is missing: put the batch back" in err
    assert "second line" not in err and "Traceback" not in err and "--debug" in err
    monkeypatch.setattr("sys.argv", ["nas", "--debug"])
    with pytest.raises(FileNotFoundError, match="put the batch back"):
        app_module.main()


def test_export_refuses_a_folder_that_is_no_checkpoint_before_loading_the_model(tmp_path, monkeypatch):
    from flows.cli import editing

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded before the checkpoint was checked")

    monkeypatch.setattr(editing, "fetch_and_load", no_model)
    (tmp_path / "ck").mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "ck"), "-o", str(tmp_path / "out")])
    assert isinstance(result.exception, FileNotFoundError) and "manifest.json is missing" in str(result.exception)


def test_every_example_parses_with_its_command_s_own_options():
    """The Example: line of each --help is a command line its command accepts (no stale option)."""
    import re
    import shlex

    import typer

    root = typer.main.get_command(app)
    wrong = []
    for path in _leaf_commands(root):
        cmd = root
        for name in path:
            cmd = cmd.commands[name]
        example = next(line for line in cmd.help.splitlines() if "Example:" in line)
        line = re.sub(r"\s+\(.*\)\s*$", "", example.split("Example:", 1)[1])  # a remark in parentheses
        segments = [shlex.split(part) for part in line.split("&&")]
        args = next((a for a in segments if a[:1] == ["nas"]), segments[0])  # "dvc repro && nas audit"
        assert args[: len(path) + 1] == ["nas", *path], f"{path}: the example runs {args[:3]}"
        try:
            cmd.make_context(" ".join(path), args[len(path) + 1:], resilient_parsing=False)
        except Exception as err:  # click's (typer vendors it): NoSuchOption, MissingParameter, BadParameter...
            if not (type(err).__name__ == "BadParameter" and "does not exist" in str(err)):  # an example's file
                wrong.append(f"{' '.join(path)}: {type(err).__name__}: {err}")
    assert not wrong, wrong


def test_anchor_refuses_a_bad_runner_before_loading_a_model():
    result = runner.invoke(app, ["anchor", "--workers", "2"])
    assert result.exit_code == 2 and "need the dask runner" in result.output
    result = runner.invoke(app, ["anchor", "--runner", "ray"])
    assert result.exit_code == 2 and "runner must be one of sequential, dask" in result.output


def test_anchor_options_go_over_the_params_runner(tmp_path, monkeypatch):
    from flows.cli.models import anchor_runner
    from flows.config.runner import RunnerSettings

    monkeypatch.setenv("NAS_PROJECT", str(tmp_path))
    assert anchor_runner(None, None, None, None) == RunnerSettings()
    (tmp_path / "params.yaml").write_text("anchor:\n  runner: {kind: dask, workers: 2, threads: 1}\n", encoding="utf-8")
    assert anchor_runner(None, None, None, None) == RunnerSettings("dask", workers=2, threads=1)
    assert anchor_runner(None, None, 4, None) == RunnerSettings("dask", workers=4, threads=1)
    assert anchor_runner(None, "tcp://h:8786", None, 2) == RunnerSettings("dask", address="tcp://h:8786", threads=2)
    assert anchor_runner("sequential", None, None, None) == RunnerSettings("sequential", threads=1)
