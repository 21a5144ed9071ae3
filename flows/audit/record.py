"""Record a promotion for the auditor: the DVC pipeline's outputs become the promoted ones.

After a night or a champion move the champion checkpoint is copied to the replay stage's
output, the metrics and plot files are written from the ledger, the runtime data is
``dvc add``-ed, every stage ``dvc commit``-ed and the remote pushed, so ``dvc status`` is
clean. docs/audit.md has the runbook.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows.audit.machine import machine_info
from flows.audit.outputs import (
    CHAMPION_DIR,
    METRICS_JSON,
    NORMS_CSV,
    NORMS_HEADER,
    PROMOTION_JSON,
    REPLAY_JSON,
    RETENTION_CSV,
    RETENTION_HEADER,
    norms_rows,
    retention_rows,
)
from flows.config.params import Params
from flows.engine.checkpoints import standalone_copy
from flows.io import write_csv, write_json
from flows.ledger.lineage import champion_of
from flows.ledger.records import Ledger

log = logging.getLogger(__name__)

#: The default DVC remote: a folder next to the repository (``dvc remote add -d local ../nas-dvc-remote``).
REMOTE_NAME = "local"
REMOTE_URL = "../nas-dvc-remote"

#: Stages of dvc.yaml, in pipeline order.
STAGES = ("fetch_model", "stats", "anchor", "replay", "evaluate")


def dvc_initialised(repo: Path) -> bool:
    return (repo / ".dvc").is_dir() and (repo / "dvc.yaml").is_file()


def _inside(path: Path, repo: Path) -> bool:
    try:
        path.resolve().relative_to(repo.resolve())
        return True
    except ValueError:
        return False


def tracked_paths(params: Params) -> list[Path]:
    """The flow's runtime data that ``dvc add`` tracks: ledger, accepted batches, checkpoints."""
    return [params.roots.ledger, params.roots.accepted, params.roots.checkpoints]


def write_promotion_outputs(params: Params) -> dict[str, Any] | None:
    """The files ``dvc repro`` would make, from what the flow made: the champion checkpoint,
    replay.json, metrics.json, norms.csv, retention.csv (``"source": "promotion"``) and
    promotion.json. Returns the promotion record (None when there is no champion)."""
    repo = params.root
    ledger = Ledger(params.roots.ledger)
    version, whash = champion_of(ledger)
    if version is None:
        return None
    entry = ledger.promotion(version) or {}
    ckpt = params.roots.resolve(entry.get("checkpoint") or params.roots.checkpoints / version)
    manifest = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("weights_hash") != whash:
        raise ValueError(f"checkpoint {ckpt} has weights {str(manifest.get('weights_hash'))[:12]}, the ledger's "
                         f"champion {version} {str(whash)[:12]}")
    standalone_copy(ckpt, repo / CHAMPION_DIR)  # the replay's output: one folder, no chain
    lineage = ledger.lineage(version)
    machine = machine_info()
    record = {"version": version, "weights_hash": whash, "checkpoint": str(ckpt.relative_to(repo))
              if _inside(ckpt, repo) else str(ckpt), "edits": manifest.get("edit_count", entry.get("edits_so_far")),
              "batch_id": entry.get("batch_id"), "time": entry.get("time"), "machine": machine}
    write_json(repo / PROMOTION_JSON, record)
    write_json(repo / REPLAY_JSON, {
        "source": "promotion", "weights_hash": whash, "ledger_champion": version, "ledger_weights_hash": whash,
        "match": True, "edits": record["edits"], "seconds": 0.0, "machine": machine,
        "note": "written at promotion by flows.audit.record.record_promotion; nothing was replayed: "
                "run `dvc repro --force --single-item replay` to rebuild"})
    retention = {k.removeprefix("retention."): v for k, v in (entry.get("metrics") or {}).items()
                 if k.startswith("retention.")}
    write_json(repo / METRICS_JSON, {"source": "promotion", "version": version, "weights_hash": whash,
                                     "edits": record["edits"], **retention})
    write_csv(repo / NORMS_CSV, NORMS_HEADER, norms_rows(lineage))
    write_csv(repo / RETENTION_CSV, RETENTION_HEADER, retention_rows(lineage))
    return record


def _dvc_sync(params: Params, push: bool) -> list[str]:
    """:mod:`flows.audit.dvc_sync` in a child process running in the project (never the flow's
    own working directory, and DVC's state stays out of the flow's process)."""
    repo = params.root
    problems = []
    add = []
    for p in tracked_paths(params):
        if not p.exists():
            continue
        if _inside(p, repo):
            add.append(str(p.resolve().relative_to(repo.resolve())))
        else:
            problems.append(f"{p} is outside the repository: DVC cannot track it")
    facts = [str(p.resolve().relative_to(repo.resolve())) for p in (params.roots.ledger, params.roots.accepted)
             if p.exists() and _inside(p, repo)]
    request = json.dumps({"add": add, "push": push, "stages": list(STAGES), "publish": facts})
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.audit.dvc_sync"], input=request, cwd=repo, env=env,
                          capture_output=True, text=True, timeout=3600)
    lines = done.stdout.strip().splitlines()
    try:
        problems += json.loads(lines[-1])["problems"]
    except (IndexError, ValueError, KeyError):
        problems.append(f"the DVC step failed (exit {done.returncode}): {(done.stderr or done.stdout)[-500:]}")
    return problems


def _git_commit(repo: Path, version: str) -> None:
    """Commit only DVC's metadata files and the small results (never anything else staged)."""
    candidates = ["dvc.lock", "data/replay/.gitignore", str(REPLAY_JSON), str(METRICS_JSON), str(NORMS_CSV),
                  str(RETENTION_CSV), str(PROMOTION_JSON), *[str(p.relative_to(repo)) for p in (repo / "data").glob(
                      "*.dvc")]]
    paths = [p for p in candidates if (repo / p).exists()]
    subprocess.run(["git", "add", "--", *paths], cwd=repo, check=True, capture_output=True, timeout=60)
    done = subprocess.run(["git", "commit", "-m", f"DVC audit: champion {version}", "--", *paths], cwd=repo,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "nothing" not in (done.stdout + done.stderr):
        raise RuntimeError(f"git commit failed: {(done.stdout + done.stderr).strip()[-300:]}")


def record_promotion(params: Params, *, push: bool = True, git_commit: bool = False) -> list[str]:
    """After a night or a champion move: make the DVC pipeline's outputs the promoted ones and record them.

    Copies the champion checkpoint to ``data/replay/champion``, writes replay.json,
    metrics.json, norms.csv, retention.csv (all ``"source": "promotion"``) and
    promotion.json (with :func:`machine_info`), ``dvc add``-s ledger, accepted batches and
    checkpoints, ``dvc commit -f``-s every stage and ``dvc push``-es to the default remote
    (``push``); ``git_commit`` also commits those metadata files. ``dvc status`` is clean
    afterwards.

    Never raises: a repository without DVC, or any failure, comes back in the returned list
    of problems (empty when everything was recorded); the night's promotion stands either way.
    The repository is the night's project root (``params.root``); with a ledger outside it
    (a test's temp folder) nothing is recorded.
    """
    repo = params.root
    try:
        if not dvc_initialised(repo):
            return [f"{repo} has no .dvc/ or dvc.yaml; not recording the promotion (dvc init)"]
        try:
            import dvc.repo  # noqa: F401
        except ImportError:
            return ["dvc is not installed; not recording the promotion"]
        ledger_path = params.roots.ledger
        if not _inside(ledger_path, repo):
            # A test or a scratch run with its own paths: never touch the repository's audit files.
            log.info("DVC audit: the ledger %s is outside %s; not recording", ledger_path, repo)
            return []
        record = write_promotion_outputs(params)
        if record is None:
            log.info("DVC audit: no champion in the ledger yet; recording the ledger only")
        found = _dvc_sync(params, push)
        problems = [p for p in found if not p.startswith("note: ")]
        for note in found:
            if note.startswith("note: "):
                log.info("DVC audit: %s", note)
        if git_commit and record is not None and not problems:
            _git_commit(repo, record["version"])
        if record is not None and not problems:
            log.info("DVC audit: champion %s (%s) recorded in dvc.lock%s%s", record["version"],
                     record["weights_hash"][:12], ", pushed" if push else "",
                     ", committed to git" if git_commit else "")
        return problems
    except Exception as err:  # the audit record must never fail the night
        return [f"recording the promotion failed: {type(err).__name__}: {err}"]
