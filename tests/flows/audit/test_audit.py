"""The DVC audit: verdicts, record_promotion, dvc.yaml, and a replay of a real nightly flow on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import FACTS, fact

from flows import io as fio
from flows.audit import machine as machine_facts
from flows.audit import outputs, record, verdict
from flows.config.params import load_params
from flows.config.runner import RunnerSettings, ScoringParams
from flows.engine import checkpoints
from flows.ledger import lineage
from flows.ledger.records import Ledger
from flows.paths import Paths

REPO = Path(__file__).resolve().parents[3]
H1, H2, H3 = "a" * 64, "b" * 64, "c" * 64


def machine(**changes) -> dict:
    m = {"torch": "2.5.1", "transformers": "4.56.0", "cpu_capability": "AVX2", "cpu_model": "AMD EPYC",
         "arch": "x86_64", "blas": "open", "lapack": "open", "mkl": "none", "openmp": "OpenMP 201511",
         "threads": 2, "device": "cpu", "dtype": "float32"}
    return {**m, **changes}


def promote(ledger: Ledger, version: str, parent: str | None, whash: str, file_sha256: str = "0" * 64,
            **extra) -> dict:
    return ledger.append("promote", batch_id=f"b-{version}", file_sha256=file_sha256, request_ids=["x"], skipped_ids=[],
                         version=version, parent=parent, weights_hash=whash, checkpoint=f"data/checkpoints/{version}",
                         accepted_path=f"data/accepted/{version}.jsonl", edits_so_far=1,
                         norm_ratios={"w": 1.01}, metrics={"retention.efficacy_success": 100.0}, **extra)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A repository folder with default params.yaml paths and a ledger whose champion is v0002 (hash H2)."""
    (tmp_path / "params.yaml").write_text("model: smollm2-135m\n", encoding="utf-8")
    ledger = Ledger(tmp_path / "data" / "ledger.jsonl")
    promote(ledger, "v0001", None, H1)
    promote(ledger, "v0002", "v0001", H2)
    return tmp_path


def write_replay(repo: Path, whash: str, champion: str = "v0002", source: str = "replay", divergence=None,
                 inputs_divergence=None, **m) -> None:
    last = {"version": "v0002", "match": whash == H2, "same_skips": True, "divergence": divergence,
            "inputs_divergence": inputs_divergence}
    fio.write_json(repo / outputs.REPLAY_JSON, {"source": source, "weights_hash": whash, "ledger_champion": champion,
                                        "ledger_weights_hash": H2, "match": whash == H2, "machine": machine(**m),
                                        "versions": [{"version": "v0001", "match": True}, last]})


def write_replay_metrics(repo: Path, version: str = "v0002", **metrics) -> None:
    fio.write_json(repo / outputs.METRICS_JSON, {"source": "replay", "version": version,
                                                 "efficacy_success": 100.0, **metrics})


def write_promotion(repo: Path, version: str = "v0002", **m) -> None:
    fio.write_json(repo / outputs.PROMOTION_JSON, {"version": version, "weights_hash": H2, "machine": machine(**m)})


# --- verdicts ------------------------------------------------------------------------------------

def test_same_hash_is_reproduced(repo):
    write_promotion(repo)
    write_replay(repo, H2)
    res = verdict.audit(load_params(project=repo))
    assert res.verdict == "reproduced" and res.ok
    assert res.ledger_weights_hash == res.replay_weights_hash == H2 and res.champion == "v0002"
    assert res.machine_differences == {}
    text = res.render()
    assert "verdict: reproduced" in text and H2 in text and "same machine facts" in text


def test_other_hash_on_the_same_machine_is_a_real_mismatch(repo):
    write_promotion(repo)
    write_replay(repo, H3)
    res = verdict.audit(load_params(project=repo))
    assert res.verdict == "NOT REPRODUCED" and not res.ok
    assert (res.ledger_weights_hash, res.replay_weights_hash) == (H2, H3)
    assert res.machine_differences == {}
    assert "machine facts are the same" in res.explanation and "v0002 differs" in res.explanation
    assert "no fingerprint" in res.explanation
    assert H2 in res.render() and H3 in res.render()


def test_other_hash_on_another_machine_names_the_differences(repo):
    write_promotion(repo)
    write_replay(repo, H3, torch="2.6.0", cpu_capability="AVX512", threads=16)
    res = verdict.audit(load_params(project=repo))
    assert res.verdict == "NOT REPRODUCED"
    assert res.machine_differences == {"torch": ("2.5.1", "2.6.0"), "cpu_capability": ("AVX2", "AVX512"),
                                       "threads": (2, 16)}
    text = res.render()
    assert "torch: '2.5.1' -> '2.6.0'" in text and "same machine type" in text


def test_same_hash_on_another_machine_is_still_reproduced(repo):
    write_promotion(repo, blas="mkl")
    write_replay(repo, H2)
    res = verdict.audit(load_params(project=repo))
    assert res.ok and res.machine_differences == {"blas": ("mkl", "open")}
    assert "even though" in res.explanation


def test_machine_at_promotion_falls_back_to_the_ledger(repo):
    promote(Ledger(repo / "data" / "ledger.jsonl"), "v0003", "v0002", H3, machine=machine(threads=4))
    write_replay(repo, H1, champion="v0003")
    res = verdict.audit(load_params(project=repo))
    assert res.verdict == "NOT REPRODUCED" and res.machine_differences == {"threads": (4, 2)}


def test_unknown_promotion_machine_cannot_rule_out_a_machine_effect(repo):
    write_replay(repo, H3)
    res = verdict.audit(load_params(project=repo))
    assert res.verdict == "NOT REPRODUCED" and "not recorded" in res.explanation


def test_other_hash_within_the_fingerprint_and_metric_tolerances_is_reproduced_within_tolerance(repo):
    write_promotion(repo)
    write_replay(repo, H3, divergence={"layers.3.mlp.down_proj.weight": 2e-6, "layers.4.mlp.down_proj.weight": 0.0},
                 inputs_divergence={"anchor": 1e-7, "covariance_trace.3": 3e-8}, threads=1)
    write_replay_metrics(repo, efficacy_success=100.0)
    res = verdict.audit(load_params(project=repo))
    assert res.verdict == "reproduced within tolerance" and res.ok, res.render()
    text = res.render()
    assert "2.0e-06: v0002 layers.3.mlp.down_proj.weight" in text and "efficacy_success: 100 rebuilt" in text
    assert "threads: 2 -> 1" in text


@pytest.mark.parametrize(("replay_kw", "metrics", "verdict_", "named"), [
    ({"divergence": {"layers.3.mlp.down_proj.weight": 1e-6, "layers.5.mlp.down_proj.weight": 0.05}},
     {}, "NOT REPRODUCED", "v0002 diverges first: layer layers.5.mlp.down_proj.weight by 5.0e-02"),
    ({"divergence": {"w": 1e-6}, "inputs_divergence": {"anchor": 0.03}}, {}, "NOT REPRODUCED", "anchor differs"),
    ({"divergence": {"w": 1e-6}}, {"efficacy_success": 90.0}, "NOT REPRODUCED", "efficacy_success differs by 10"),
    ({"divergence": {"w": 1e-6}}, None, "NOT REPLAYED", "dvc repro evaluate"),
])
def test_outside_the_tolerances_names_what_diverged(repo, replay_kw, metrics, verdict_, named):
    write_promotion(repo)
    write_replay(repo, H3, **replay_kw)
    if metrics is not None:
        write_replay_metrics(repo, **metrics)
    res = verdict.audit(load_params(project=repo))
    assert res.verdict == verdict_ and not res.ok and named in res.explanation, res.render()


def test_nothing_replayed_yet(repo):
    assert verdict.audit(load_params(project=repo)).verdict == "NOT REPLAYED"
    write_replay(repo, H2, source="promotion")
    res = verdict.audit(load_params(project=repo))
    assert res.verdict == "NOT REPLAYED" and "dvc repro --force --single-item replay" in res.explanation


def test_a_replay_of_an_older_champion_is_stale(repo):
    write_replay(repo, H1, champion="v0001")
    assert verdict.audit(load_params(project=repo)).verdict == "STALE"


def test_rollback_champion_uses_its_promotion_hash(repo):
    Ledger(repo / "data" / "ledger.jsonl").append("rollback", version="v0001", reason="bad answers")
    write_replay(repo, H1, champion="v0001")
    res = verdict.audit(load_params(project=repo))
    assert res.ok and res.ledger_weights_hash == H1


def test_nas_audit_exit_status(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli.app import app
    from flows.paths import ENV_PROJECT

    monkeypatch.setenv(ENV_PROJECT, str(tmp_path))  # recorded: `nas --project` sets it again, undone afterwards
    (tmp_path / "params.yaml").write_text("model: smollm2-135m\n", encoding="utf-8")
    ledger = Ledger(tmp_path / "data" / "ledger.jsonl")
    for version, parent, whash in (("v0001", None, H1), ("v0002", "v0001", H2)):
        batch = tmp_path / "data" / "accepted" / f"{version}.jsonl"
        batch.parent.mkdir(parents=True, exist_ok=True)
        batch.write_text(json.dumps(fact(*FACTS[0])) + "\n", encoding="utf-8")
        promote(ledger, version, parent, whash, file_sha256=fio.sha256_file(batch))
    write_replay(tmp_path, H3)
    result = CliRunner().invoke(app, ["--project", str(tmp_path), "audit"])
    assert result.exit_code == 1 and "NOT REPRODUCED" in result.output, result.output
    write_replay(tmp_path, H2)
    result = CliRunner().invoke(app, ["--project", str(tmp_path), "audit", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["verdict"] == "reproduced", result.output


def test_machine_info_has_every_fact_the_audit_compares():
    info = machine_facts.machine_info()
    assert set(machine_facts.BIT_KEYS) <= set(info)
    assert info["threads"] >= 1 and info["device"] == "cpu" and info["dtype"] == "float32"
    json.dumps(info)


# --- lineage checks ------------------------------------------------------------------------------

def fact_line(case_id: str, subject: str) -> dict:
    return {"case_id": case_id, "prompt": "{} is located in", "subject": subject, "target_new": "Rome",
            "target_true": "Paris", "relation_id": "P131"}


def test_lineage_batches_refuse_altered_files_and_keep_skipped_requests(tmp_path):
    batch = tmp_path / "data" / "accepted" / "n1.jsonl"
    batch.parent.mkdir(parents=True)
    batch.write_text("".join(json.dumps(fact_line(c, s)) + "\n" for c, s in [("a", "A"), ("b", "B"), ("c", "C")]),
                     encoding="utf-8")
    ledger = Ledger(tmp_path / "data" / "ledger.jsonl")
    ledger.append("promote", batch_id="n1", file_sha256=fio.sha256_file(batch), request_ids=["a", "c"],
                  skipped_ids=["b"], version="v0001", parent=None, weights_hash=H1,
                  accepted_path="data/accepted/n1.jsonl", edits_so_far=2)
    [b] = lineage.lineage_batches(ledger, "v0001", Paths().under(tmp_path), batch_size=2)
    assert [r.case_id for r in b.requests] == ["a", "b", "c"] and b.batch_size == 2
    assert [r.case_id for r, _ in lineage.held_facts([b], True)] == ["a", "c"]
    assert [r.case_id for r in lineage.retention_requests([b], True)] == ["a", "b", "c"]
    batch.write_text(batch.read_text() + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="altered"):
        lineage.lineage_batches(ledger, "v0001", Paths().under(tmp_path), batch_size=2)


# --- record_promotion ----------------------------------------------------------------------------

def test_record_promotion_without_dvc_reports_and_never_raises(repo):
    problems = record.record_promotion(load_params(project=repo))
    assert len(problems) == 1 and "no .dvc/" in problems[0]
    assert not (repo / outputs.REPLAY_JSON).exists()


def test_record_promotion_ignores_a_ledger_outside_the_repository(repo, tmp_path_factory):
    (repo / ".dvc").mkdir()
    (repo / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    params = elsewhere / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": {"ledger": str(repo / "data" / "ledger.jsonl").replace(
        str(repo), str(elsewhere))}}), encoding="utf-8")
    assert record.record_promotion(load_params(params, repo)) == []
    assert not (repo / "data" / "replay").exists()


MINI_DVC_YAML = """
stages:
  replay:
    cmd: python -m flows.stages.replay
    deps: [data/ledger.jsonl, data/accepted]
    outs: [data/replay/champion]
    metrics:
      - data/replay/replay.json:
          cache: false
  evaluate:
    cmd: python -m flows.stages.evaluate
    deps: [data/replay/champion]
    metrics:
      - data/replay/metrics.json:
          cache: false
    plots:
      - data/replay/norms.csv:
          cache: false
      - data/replay/retention.csv:
          cache: false
"""


def dvc(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_record_promotion_leaves_dvc_status_clean_and_pushes(repo, tmp_path_factory, caplog, monkeypatch):
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}.items():
        monkeypatch.setenv(k, v)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("/data/ledger.jsonl\n/data/accepted/\n/data/checkpoints/\n", encoding="utf-8")
    dvc("init", "-q", cwd=repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    remote = tmp_path_factory.mktemp("remote")
    dvc("remote", "add", "-d", "local", str(remote), cwd=repo)
    dvc("remote", "add", "lineage", str(repo / "dvc-lineage"), cwd=repo)  # inside the repository, as shipped
    (repo / "dvc.yaml").write_text(MINI_DVC_YAML, encoding="utf-8")
    for v in ("v0001", "v0002"):
        (repo / "data" / "accepted" / f"{v}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (repo / "data" / "accepted" / f"{v}.jsonl").write_text(json.dumps(fact_line(v, v)) + "\n", encoding="utf-8")
        ckpt = repo / "data" / "checkpoints" / v
        ckpt.mkdir(parents=True)
        (ckpt / "deltas.safetensors").write_bytes(v.encode() * 10)
        (ckpt / "state.safetensors").write_bytes(b"state")
        (ckpt / "manifest.json").write_text(json.dumps({"weights_hash": {"v0001": H1, "v0002": H2}[v],
                                                        "edit_count": 2}), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="flows.audit.record"):
        assert record.record_promotion(load_params(project=repo)) == []
    # the mini dvc.yaml has no fetch_model/stats/anchor stage: warned about, never fatal
    assert "dvc.yaml has no stage fetch_model" in caplog.text
    assert (repo / outputs.CHAMPION_DIR / "deltas.safetensors").read_bytes() == b"v0002" * 10
    replay = json.loads((repo / outputs.REPLAY_JSON).read_text())
    assert replay["source"] == "promotion" and replay["weights_hash"] == H2 and replay["ledger_champion"] == "v0002"
    assert json.loads((repo / outputs.PROMOTION_JSON).read_text())["machine"]["torch"]
    assert json.loads((repo / outputs.METRICS_JSON).read_text())["efficacy_success"] == 100.0
    assert (repo / outputs.NORMS_CSV).read_text().splitlines()[0] == "version,edits_so_far,layer,norm_ratio,source"
    for name in ("ledger.jsonl.dvc", "accepted.dvc", "checkpoints.dvc"):
        assert (repo / "data" / name).is_file()
    assert "up to date" in dvc("status", cwd=repo)
    assert "in sync" in dvc("status", "--cloud", cwd=repo)  # everything was pushed
    # the facts (and only they) were published to the in-repository lineage remote too
    assert "in sync" in dvc("status", "--cloud", "-r", "lineage", "data/ledger.jsonl.dvc", "data/accepted.dvc",
                            cwd=repo)
    assert "deleted" in dvc("status", "--cloud", "-r", "lineage", "data/checkpoints.dvc", cwd=repo) or \
        "new" in dvc("status", "--cloud", "-r", "lineage", "data/checkpoints.dvc", cwd=repo)
    assert (repo / "dvc-lineage" / "files" / "md5").is_dir()
    assert verdict.audit(load_params(project=repo)).verdict == "NOT REPLAYED"
    # a second promotion: only the new data changes, and the status is clean again
    promote(Ledger(repo / "data" / "ledger.jsonl"), "v0003", "v0002", H3)
    shutil.copytree(repo / "data" / "checkpoints" / "v0002", repo / "data" / "checkpoints" / "v0003")
    (repo / "data" / "checkpoints" / "v0003" / "manifest.json").write_text(json.dumps({"weights_hash": H3}))
    assert record.record_promotion(load_params(project=repo), git_commit=True) == []
    assert json.loads((repo / outputs.REPLAY_JSON).read_text())["ledger_champion"] == "v0003"
    assert "up to date" in dvc("status", cwd=repo)
    committed = subprocess.run(["git", "show", "--name-only", "--format=%s", "HEAD"], cwd=repo, capture_output=True,
                               text=True, check=True).stdout
    assert "DVC audit: champion v0003" in committed and "dvc.lock" in committed
    assert "data/ledger.jsonl.dvc" in committed and "params.yaml" not in committed


# --- dvc.yaml --------------------------------------------------------------------------------------

def test_dvc_yaml_lists_the_five_stages(tmp_path):
    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    model = yaml.safe_load((REPO / "params.yaml").read_text())["model"]
    with Repo(str(tmp_path)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        assert list(stages) == list(record.STAGES)

        def paths(items) -> set[str]:
            return {str(Path(o.def_path)) for o in items}

        assert paths(stages["fetch_model"].outs) == {f"data/models/{model}"}
        for name in ("fetch_model", "stats", "anchor"):  # shared caches: never deleted by dvc repro
            assert all(o.persist and o.use_cache for o in stages[name].outs)
        assert paths(stages["stats"].outs) == {f"data/stats/{model}"}
        assert paths(stages["anchor"].outs) == {f"data/anchors/{model}"}
        replay_outs = {str(Path(o.def_path)): o for o in stages["replay"].outs}
        assert set(replay_outs) == {"data/replay/champion", "data/replay/replay.json"}
        assert replay_outs["data/replay/replay.json"].metric and not replay_outs["data/replay/replay.json"].use_cache
        deps = paths(stages["replay"].deps)
        assert {"data/ledger.jsonl", "data/accepted", f"data/models/{model}", f"data/stats/{model}",
                f"data/anchors/{model}", "flows/stages", "flows/engine", "flows/ledger"} <= deps
        assert "params.yaml" in deps  # the params dependency
        evaluate_outs = {str(Path(o.def_path)): o for o in stages["evaluate"].outs}
        assert evaluate_outs["data/replay/metrics.json"].metric
        assert evaluate_outs["data/replay/norms.csv"].plot and evaluate_outs["data/replay/retention.csv"].plot
        assert "data/replay/champion" in paths(stages["evaluate"].deps)
        for stage in stages.values():
            assert stage.cmd == f"python -m flows.stages.{stage.name}"
            assert (REPO / "flows" / "stages" / f"{stage.name}.py").is_file()
            for dep in stage.deps:
                p = Path(dep.def_path)
                if p.parts[0] in ("flows", "nas_core", "configs") or p.name in ("pilot_facts.jsonl", "canary.txt"):
                    assert (REPO / p).exists(), f"{stage.name}: code/config dependency {p} does not exist"
    top = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    assert top[0]["retention"]["y"]["data/replay/retention.csv"][0] == "efficacy_success"


def test_dvc_metrics_and_plots_show_read_the_stage_outputs(repo, tmp_path_factory):
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    dvc("init", "--no-scm", "-q", cwd=repo)
    entries = Ledger(repo / "data" / "ledger.jsonl").lineage("v0002")
    write_replay(repo, H2)
    fio.write_json(repo / outputs.METRICS_JSON,
                   {"source": "replay", "version": "v0002", "edits": 2, "efficacy_success": 95.0})
    fio.write_csv(repo / outputs.NORMS_CSV, outputs.NORMS_HEADER, outputs.norms_rows(entries, {"w": 1.02}, "v0002", 2))
    fio.write_csv(repo / outputs.RETENTION_CSV, outputs.RETENTION_HEADER,
                outputs.retention_rows(entries, {"efficacy_success": 95.0, "editing_score": 80.0}, "v0002", 2))
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo))
    metrics = shown[""]["data"]
    assert metrics["data/replay/replay.json"]["data"]["weights_hash"] == H2
    assert metrics["data/replay/metrics.json"]["data"]["efficacy_success"] == 95.0
    out = tmp_path_factory.mktemp("plots")
    dvc("plots", "show", "-o", str(out), cwd=repo)
    html = (out / "index.html").read_text()
    assert all(f"vegaEmbed('#{p}'" in html for p in ("retention", "data_replay_norms_csv", "data_replay_retention_csv"))


def test_one_statistics_file_covers_every_method_s_layers():
    from flows.config.model import config_for

    cfg = config_for("smollm2-135m")
    assert cfg.all_layers() == sorted({*cfg.memit.layers, *cfg.alphaedit.layers, *cfg.rome.layers})
    assert set(cfg.rome.layers) <= set(cfg.all_layers()) and cfg.all_layers() == sorted(set(cfg.all_layers()))


def test_stage_modules_import_without_prefect():
    code = ("import sys; import flows.stages.replay, flows.stages.evaluate, flows.stages.stats, "
            "flows.stages.anchor, flows.stages.fetch_model, flows.audit.record, flows.audit.verdict; "
            "assert 'prefect' not in sys.modules, 'a stage imported prefect'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)


# --- the real thing on a tiny model: a Prefect nightly flow, then the replay and evaluate stages ------

TINY_CONFIG = {
    "model": None,
    "layers_note": "tiny test model",
    "stats": {"corpus": None, "tokens": 3000, "seq_len": 32, "batch_size": 8},
    "values": {"steps": 8, "early_stop_nll": 0.5},
    # A low outlier factor makes NAS skip some requests: the replay must pass them to apply() too.
    "nas": {"pilots": 4, "pilot_batch_size": 4, "outlier_factor": 1.05},
    "memit": {"layers": [0, 1], "mom2_weight": 10.0},
    # The tiny model's C has no eigenvalue below AlphaEdit's absolute 0.02: a relative cut gives it
    # a null space, so the replayed edits really move the weights.
    "alphaedit": {"layers": [0, 1], "nullspace_relative_threshold": 0.2},
    "rome": {"layers": [1]},
}


def tiny_params(work: Path, tok) -> Path:
    from tiny import CORPUS, tiny_model

    folder = work / "tiny-llama"
    tiny_model("llama").save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    corpus = work / "corpus.txt"
    corpus.write_text(" ".join(CORPUS * 60), encoding="utf-8")
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["model"], cfg["stats"]["corpus"] = str(folder), str(corpus)
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    d = work / "data"
    doc = {
        "model": str(work / "tiny.yaml"),
        "edit": {"method": "alphaedit", "nas": True, "batch_size": 2},
        "paths": {"inbox": str(d / "inbox"), "accepted": str(d / "accepted"), "quarantine": str(d / "quarantine"),
                  "checkpoints": str(d / "checkpoints"), "ledger": str(d / "ledger.jsonl"),
                  "reports": str(d / "reports"), "models": str(d / "models"), "stats": str(d / "stats"),
                  "anchors": str(d / "anchors"), "eval_cache": str(d / "eval"),
                  "shared_data": str(REPO.parent / "shared" / "data"), "demo": str(REPO / "data" / "demo")},
        "promotion": {"min_batch_efficacy": 0.0, "min_batch_generalisation": 0.0, "min_batch_specificity": 0.0,
                      "min_retention_efficacy": 0.0, "max_norm_growth_per_edit": 1.0, "max_skipped_fraction": 1.0},
        "eval": {"general_tasks": [], "canary_tokens": 128, "canary_window": 32, "fluency_prompts": 0},
        "collapse": {"min_editing_score": 0.0, "max_perplexity_ratio": 1000.0, "max_norm_ratio": 100.0},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "audit-test"},
        "audit": {"weights_rel_tol": 0.05},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    return work / "params.yaml"


def write_batch(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.mark.slow
def test_replay_rebuilds_the_flows_champion_bit_for_bit(prefect, tmp_path, tok, monkeypatch):
    from flows.refresh.flow import nightly_refresh
    from flows.stages.evaluate import evaluate
    from flows.stages.replay import replay

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params_file = tiny_params(tmp_path, tok)
    inbox = tmp_path / "data" / "inbox"
    # night 1: two batches (the first in two sub-batches of 2), continued in memory; night 2 reloads v0002
    write_batch(inbox / "night-01.jsonl", [fact(*f) for f in FACTS[:3]])
    write_batch(inbox / "night-02.jsonl", [fact(*FACTS[3])])
    assert [o.outcome for o in nightly_refresh(str(params_file), str(tmp_path))] == ["promoted", "promoted"]
    write_batch(inbox / "night-03.jsonl", [fact(*f) for f in FACTS[4:]])
    assert [o.outcome for o in nightly_refresh(str(params_file), str(tmp_path))] == ["promoted"]
    ledger = Ledger(tmp_path / "data" / "ledger.jsonl")
    champ = ledger.champion()
    assert champ["version"] == "v0003"
    assert any(e["skipped_ids"] for e in ledger.promotions()), "no request skipped: the test lost its point"

    doc = replay(load_params(params_file, tmp_path), tmp_path / outputs.CHAMPION_DIR, tmp_path / outputs.REPLAY_JSON)
    assert doc["base_weights_hash"] not in {e["weights_hash"] for e in ledger.promotions()}, "no edit moved weights"
    # (a batch whose every request NAS skipped keeps its parent's weights: at least two distinct)
    assert len({e["weights_hash"] for e in ledger.promotions()}) >= 2
    assert doc["match"] and doc["weights_hash"] == champ["weights_hash"], doc["versions"]
    assert [v["version"] for v in doc["versions"]] == ["v0001", "v0002", "v0003"]
    assert all(v["match"] and v["same_skips"] for v in doc["versions"])
    assert all(r == 0.0 for v in doc["versions"] for r in v["divergence"].values())
    assert doc["edits"] == champ["edits_so_far"]
    rebuilt = json.loads((tmp_path / outputs.CHAMPION_DIR / "manifest.json").read_text())
    flow_manifest = json.loads((tmp_path / "data" / "checkpoints" / "v0003" / "manifest.json").read_text())
    assert rebuilt["weights_hash"] == flow_manifest["weights_hash"]
    # The replay's one folder holds, byte for byte, the increments of the flow's chain v0001-v0003.
    flat = checkpoints.standalone_copy(tmp_path / "data" / "checkpoints" / "v0003", tmp_path / "flat")
    assert flow_manifest["parent"]["version"] == "v0002" and rebuilt["parent"] is None
    assert ((tmp_path / outputs.CHAMPION_DIR / "increment.safetensors").read_bytes()
            == (flat / "increment.safetensors").read_bytes())
    mine, theirs = (checkpoints.read_checkpoint(p).deltas for p in (tmp_path / outputs.CHAMPION_DIR, flat))
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)

    fio.write_json(tmp_path / outputs.PROMOTION_JSON, {"version": "v0003", "machine": machine_facts.machine_info()})
    res = verdict.audit(load_params(params_file, tmp_path))
    assert res.verdict == "reproduced", res.render()

    out = evaluate(load_params(params_file, tmp_path), tmp_path / outputs.CHAMPION_DIR, tmp_path / outputs.REPLAY_DIR)
    flow_metrics = {k.removeprefix("retention."): v for k, v in champ["metrics"].items() if k.startswith("retention.")}
    assert flow_metrics and {k: out[k] for k in flow_metrics} == flow_metrics  # the flow's numbers, exactly
    # The same evaluation with the scoring in three shards on a two-worker Dask cluster, at the flow's
    # torch threads (a worker's default is 1; equal threads give equal bits): the same numbers.
    sharded = dataclasses.replace(load_params(params_file, tmp_path), scoring=ScoringParams(
        3, RunnerSettings("dask", workers=2, threads=torch.get_num_threads())))
    out_sharded = evaluate(sharded, tmp_path / outputs.CHAMPION_DIR, tmp_path / "replay-sharded")
    assert {k: out_sharded[k] for k in flow_metrics} == flow_metrics
    norms = (tmp_path / outputs.NORMS_CSV).read_text().splitlines()
    assert norms[0] == "version,edits_so_far,layer,norm_ratio,source" and any(",replay" in r for r in norms)
    assert len((tmp_path / outputs.RETENTION_CSV).read_text().splitlines()) == 1 + 3 + 1


    # Other arithmetic: every Woodbury solve off in its last bits (x (1 + 1e-8), as another LAPACK,
    # thread count or CPU gives): another hash, the same model within the audit tolerances. (The
    # tiny model's updates then move by 0.3-1.3%, far more than the perturbation; params.yaml's
    # audit.weights_rel_tol is sized on the real model, docs/audit.md.)
    import nas_core.editors.alphaedit as alphaedit

    exact = alphaedit.woodbury_solve

    def off_by(scale: float):
        def solve(*args):
            x, inverse = exact(*args)
            return x * scale, inverse
        return solve

    params = load_params(params_file, tmp_path)
    assert all(e.get("fingerprints") and e.get("inputs") for e in ledger.promotions())
    monkeypatch.setattr(alphaedit, "woodbury_solve", off_by(1 + 1e-8))
    doc = replay(params, tmp_path / outputs.CHAMPION_DIR, tmp_path / outputs.REPLAY_JSON)
    assert not doc["match"] and all(v["divergence"] for v in doc["versions"])
    evaluate(params, tmp_path / outputs.CHAMPION_DIR, tmp_path / outputs.REPLAY_DIR)
    res = verdict.audit(params)
    assert res.verdict == "reproduced within tolerance" and res.ok, res.render()
    assert any(c.startswith("weights: every version") for c in res.checks)
    # A real difference (every update a quarter larger) is named by its first version and layer.
    monkeypatch.setattr(alphaedit, "woodbury_solve", off_by(1.25))
    replay(params, tmp_path / outputs.CHAMPION_DIR, tmp_path / outputs.REPLAY_JSON)
    res = verdict.audit(params)
    assert res.verdict == "NOT REPRODUCED" and "v0001 diverges first: layer " in res.explanation, res.render()


def test_the_shipped_lineage_s_facts_are_in_the_repository_s_own_remote():
    """A fresh clone audits with nothing beside it: every object the ledger and accepted-batch
    pointers name is committed under dvc-lineage/ (the `lineage` remote of .dvc/config)."""
    remote = REPO / "dvc-lineage" / "files" / "md5"
    assert "../dvc-lineage" in (REPO / ".dvc" / "config").read_text()

    def obj(md5: str) -> Path:
        return remote / md5[:2] / md5[2:]

    for pointer in ("data/ledger.jsonl.dvc", "data/accepted.dvc"):
        (out,) = yaml.safe_load((REPO / pointer).read_text())["outs"]
        assert obj(out["md5"]).is_file(), f"{pointer}: {out['md5']} is not in dvc-lineage/"
        if out["md5"].endswith(".dir"):
            entries = json.loads(obj(out["md5"]).read_text())
            assert entries and all(obj(e["md5"]).is_file() for e in entries), pointer
