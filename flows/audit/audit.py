"""The DVC audit: rebuild the ledger's champion from the base model and check it bit for bit.

The question an auditor asks is "do the weights we serve follow from the facts we accepted,
and nothing else?". ``dvc.yaml`` answers it with five stages::

    fetch_model -> stats ----\\
         \\-----> anchor -----> replay -> evaluate

``replay`` re-applies the champion's lineage (every accepted batch of the ledger, oldest
first, each batch's valid records in file order, in sub-batches of ``edit.batch_size``:
the calls the nightly flow made) to the base model, writes the result to
``data/replay/champion/`` and its weights hash to ``data/replay/replay.json``; ``evaluate``
scores it (``data/replay/metrics.json``, ``norms.csv``, ``retention.csv``). :func:`audit`
compares the rebuilt hash with the one the ledger recorded at promotion.

How the data gets to an auditor on a fresh clone
------------------------------------------------
Everything big or produced at run time lives in DVC, never in git:

* **Stage outputs** (``dvc.yaml``): the fetched model ``data/models/MODEL``, the covariance
  statistics ``data/stats/MODEL``, the NAS anchors ``data/anchors/MODEL`` and the champion
  checkpoint ``data/replay/champion``. Their hashes are in ``dvc.lock``.
* **Runtime data of the nightly flow**, tracked with ``dvc add``: the ledger
  ``data/ledger.jsonl``, the accepted batches ``data/accepted/`` and every promoted
  checkpoint ``data/checkpoints/`` (pointer files ``data/*.dvc``). ``.gitignore`` keeps the
  data itself out of git; the pointer files are small and go to git.
* **Small text results**, in git: ``data/replay/replay.json`` and ``metrics.json``
  (``cache: false`` metrics), ``norms.csv``, ``retention.csv`` (plots) and
  ``promotion.json`` (which machine built the champion, written by :func:`record_promotion`).
* The data goes to the **default DVC remote**, ``local`` = ``../nas-dvc-remote`` (a folder
  next to the repository, outside it; stored in ``.dvc/config`` relative to ``.dvc/``). A
  clone elsewhere points it at the real folder with
  ``dvc remote modify --local local url /path/to/nas-dvc-remote``.

After each promotion the nightly flow calls :func:`record_promotion`: it copies the promoted
checkpoint to ``data/replay/champion``, writes ``replay.json`` / ``metrics.json`` / the CSVs
from the ledger (marked ``"source": "promotion"``: nothing was replayed yet) and
``promotion.json`` with the machine facts, ``dvc add``-s the ledger, accepted batches and
checkpoints, ``dvc commit -f``-s every stage (so ``dvc status`` is clean: the flow built
those outputs with the same code the stages run) and ``dvc push``-es to the default remote.
With ``git_commit=True`` it also commits the DVC metadata files (``dvc.lock``, ``data/*.dvc``,
``data/replay/*.json|csv``) and nothing else. It never raises: without DVC it logs a warning.

An auditor then runs::

    git clone REPO && cd REPO && python -m venv .venv && .venv/bin/pip install -e .
    source .venv/bin/activate             # the stages run `python -m flows.stages.X`
    dvc remote modify --local local url /path/to/nas-dvc-remote   # only if not ../nas-dvc-remote
    dvc pull                               # ledger, accepted batches, model, stats, anchor, champion
    dvc repro --force --single-item replay # rebuild the champion from the base model
    dvc repro evaluate                     # score it (runs when the rebuilt folder differs)
    python -m flows.audit.audit                  # or `nas audit`: "reproduced" or "MISMATCH"

``dvc repro`` alone does nothing after :func:`record_promotion` (the pipeline is up to date
by construction), hence ``--force --single-item replay``; ``python -m flows.audit.audit --repro``
does the two ``dvc repro`` calls itself. ``dvc metrics diff`` then compares the promotion's
metrics with the replay's, and ``dvc diff`` lists which files of ``data/replay/champion``
changed (only ``manifest.json`` with its timings when the weights reproduce).

Bit-identity holds on the same machine type and software: the edits are deterministic, but
a different CPU (SIMD dispatch), BLAS/LAPACK library, torch version or thread count can
change the last bits of the solves. :func:`machine_info` records what matters at promotion
(``promotion.json``) and at replay (``replay.json``); :func:`audit` lists the differences
next to a mismatch.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.config.params import Params, load_params
from flows.engine.checkpoints import replace_dir
from flows.io import sha256_file  # noqa: F401 (re-exported: callers hash batches with it)
from flows.ledger.identity import FactIdentity, identity_of, latest_facts
from flows.ledger.records import Ledger
from flows.paths import Roots, project_root
from nas_core.formats import SchemaPolicy, parse_fact_jsonl
from nas_core.requests import EditRequest

log = logging.getLogger(__name__)

REPLAY_DIR = Path("data/replay")
CHAMPION_DIR = REPLAY_DIR / "champion"
REPLAY_JSON = REPLAY_DIR / "replay.json"
METRICS_JSON = REPLAY_DIR / "metrics.json"
NORMS_CSV = REPLAY_DIR / "norms.csv"
RETENTION_CSV = REPLAY_DIR / "retention.csv"
PROMOTION_JSON = REPLAY_DIR / "promotion.json"

#: The default DVC remote: a folder next to the repository (``dvc remote add -d local ../nas-dvc-remote``).
REMOTE_NAME = "local"
REMOTE_URL = "../nas-dvc-remote"

#: Stages of dvc.yaml, in pipeline order.
STAGES = ("fetch_model", "stats", "anchor", "replay", "evaluate")

#: Machine facts that can change the last bits of an edit (compared by :func:`audit`).
BIT_KEYS = ("torch", "transformers", "cpu_capability", "cpu_model", "arch", "blas", "lapack", "mkl", "openmp",
            "threads", "device", "dtype", "env")

#: Retention columns of retention.csv (the flow's ``retention.*`` metrics).
RETENTION_COLUMNS = ("efficacy_success", "generalisation_success", "specificity_success", "editing_score",
                     "perplexity_ratio", "general_drop", "norm_ratio_max")


# --- machine facts --------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _torch_config() -> dict[str, str]:
    """BLAS / LAPACK / MKL / OpenMP facts of ``torch.__config__.show()``."""
    import torch

    out: dict[str, str] = {}
    text = torch.__config__.show()
    for key, pattern in (("blas", r"\bBLAS_INFO=([^,\s]+)"), ("lapack", r"\bLAPACK_INFO=([^,\s]+)")):
        m = re.search(pattern, text)
        if m:
            out[key] = m.group(1)
    for line in text.splitlines():
        line = line.strip().lstrip("- ").strip()
        if "Math Kernel Library" in line:
            out["mkl"] = line
        elif line.startswith("OpenMP"):
            out["openmp"] = line
    return out


#: Environment variables that change threads or kernel choice (MKL_CBWR pins MKL's code path).
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
            "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA")


def machine_info(model: Any = None) -> dict[str, Any]:
    """What decides whether two runs of the same edit are bit-identical, as JSON-able facts.

    ``model``: where given, its device and dtype (the product edits fp32 on CPU).
    """
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency of the project
        tf_version = None
    device, dtype = "cpu", "float32"
    if model is not None:
        p = next(model.parameters())
        device, dtype = str(p.device), str(p.dtype).removeprefix("torch.")
    cfg = _torch_config()
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "arch": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "blas": cfg.get("blas", "unknown"),
        "lapack": cfg.get("lapack", "unknown"),
        "mkl": cfg.get("mkl", "none") if torch.backends.mkl.is_available() else "none",
        "openmp": cfg.get("openmp", "unknown"),
        "device": device,
        "dtype": dtype,
        "cuda": torch.version.cuda,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """``key: (a, b)`` for each :data:`BIT_KEYS` fact that differs (nothing when either is unknown)."""
    if not a or not b:
        return {}
    return {k: (a.get(k), b.get(k)) for k in BIT_KEYS if a.get(k) != b.get(k)}


# --- the champion's lineage ------------------------------------------------------------------------

def _parse_accepted(path: Path, data: bytes, policy: SchemaPolicy | None) -> list[EditRequest]:
    """The requests of an accepted batch's bytes, in file order: the ``validation.requests`` the
    flow applied (decoded as the night decodes; an accepted batch has no refusing problem)."""
    report = parse_fact_jsonl(data.decode("utf-8"), policy)
    if report.problems:
        raise ValueError(f"accepted batch {path} no longer parses cleanly: {report.problems[0]}")
    return list(report.requests)


@dataclass(frozen=True)
class LineageBatch:
    """One promote entry of the champion's lineage with the requests the flow applied."""

    version: str
    batch_id: str
    path: Path
    requests: tuple[EditRequest, ...]
    request_ids: tuple[str, ...]
    skipped_ids: tuple[str, ...]
    weights_hash: str
    edits_so_far: int
    batch_size: int
    entry: dict[str, Any] = field(repr=False, compare=False)


def champion_of(ledger: Ledger) -> tuple[str | None, str | None]:
    """(version, weights hash) of the ledger's champion; (None, None) for the base model."""
    champ = ledger.champion()
    if champ is None:
        return None, None
    version = champ["version"]
    whash = champ.get("weights_hash")
    if whash is None or champ["event"] != "promote":
        promoted = ledger.promotion(version)
        whash = promoted.get("weights_hash") if promoted else whash
    return version, whash


def lineage_batches(ledger: Ledger, version: str | None, roots: Roots, batch_size: int,
                    policy: SchemaPolicy | None = None) -> list[LineageBatch]:
    """The accepted batches that built ``version``, oldest first, checked against the ledger.

    Each batch file must still hash to the ledger's ``file_sha256`` and its records, minus
    the ledger's ``skipped_ids``, must be the ledger's ``request_ids`` in order. A promote
    entry's ``edit_batch_size`` (when the flow records it) wins over ``batch_size``.
    """
    out = []
    for entry in ledger.lineage(version) if version else []:
        path = roots.resolve(entry["accepted_path"])
        if not path.is_file():
            raise FileNotFoundError(f"{entry['version']}: accepted batch {path} is missing (dvc pull?)")
        data = path.read_bytes()  # one read: the bytes hashed are the bytes parsed
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["file_sha256"]:
            raise ValueError(f"{entry['version']}: {path} hashes to {digest[:12]}, the ledger recorded "
                             f"{entry['file_sha256'][:12]}: the accepted batch was altered")
        requests = _parse_accepted(path, data, policy)
        skipped = tuple(entry.get("skipped_ids", ()))
        applied = [r.case_id for r in requests if r.case_id not in set(skipped)]
        if applied != list(entry["request_ids"]):
            raise ValueError(f"{entry['version']}: the records of {path} minus skipped_ids are not the ledger's "
                             f"request_ids in order ({len(applied)} vs {len(entry['request_ids'])})")
        out.append(LineageBatch(entry["version"], entry["batch_id"], path, tuple(requests),
                                tuple(entry["request_ids"]), skipped, entry["weights_hash"],
                                int(entry.get("edits_so_far", 0)), int(entry.get("edit_batch_size") or batch_size),
                                entry))
    return out


def held_facts(batches: Sequence[LineageBatch], confusables: bool) -> list[tuple[EditRequest, str]]:
    """``(request, batch id)`` of every fact the champion holds, oldest first: a later record
    of the same fact (:mod:`flows.ledger.identity`) replaces an earlier one. The night's retention
    set and ledger facts (``flows.refresh.flow.lineage_requests``) are this list."""
    pairs = [(r, b.batch_id) for b in batches for r in b.requests if r.case_id in set(b.request_ids)]
    return latest_facts(pairs, lambda pair: _identity(pair[0], confusables))


def _identity(r: EditRequest, confusables: bool) -> FactIdentity:
    return identity_of(r.subject, r.relation_id, r.prompt, confusables)


def retention_set(held: Sequence[EditRequest], new: Sequence[EditRequest], confusables: bool) -> list[EditRequest]:
    """What a candidate's retention is scored on: the held facts no new request re-states
    (a passed batch supersedes them), then the whole new batch (skipped requests too)."""
    keys = [_identity(r, confusables) for r in new]
    return [r for r in held if not any(_identity(r, confusables).same_fact(k) for k in keys)] + list(new)


def retention_requests(batches: Sequence[LineageBatch], confusables: bool) -> list[EditRequest]:
    """The :func:`retention_set` the flow scored when it promoted the last of ``batches``."""
    if not batches:
        return []
    held = [r for r, _ in held_facts(batches[:-1], confusables)]
    return retention_set(held, batches[-1].requests, confusables)


# --- plot data ---------------------------------------------------------------------------------------

NORMS_HEADER = ("version", "edits_so_far", "layer", "norm_ratio", "source")
RETENTION_HEADER = ("version", "edits_so_far", *RETENTION_COLUMNS, "source")


def norms_rows(entries: Sequence[dict[str, Any]], current: dict[str, float] | None = None, version: str | None = None,
               edits: int = 0, source: str = "replay") -> list[dict[str, Any]]:
    """||W_t||/||W_0|| per layer after each promotion of the lineage (and of the current model)."""
    rows: list[dict[str, Any]] = []
    layers = list((entries[0].get("norm_ratios") or {}) if entries else (current or {}))
    for layer in layers:
        rows.append({"version": "base", "edits_so_far": 0, "layer": layer, "norm_ratio": 1.0, "source": "base"})
    for e in entries:
        for layer, r in (e.get("norm_ratios") or {}).items():
            rows.append({"version": e["version"], "edits_so_far": e.get("edits_so_far", 0), "layer": layer,
                         "norm_ratio": r, "source": "ledger"})
    for layer, r in (current or {}).items():
        rows.append({"version": version or "base", "edits_so_far": edits, "layer": layer, "norm_ratio": r,
                     "source": source})
    return rows


def retention_rows(entries: Sequence[dict[str, Any]], current: dict[str, Any] | None = None,
                   version: str | None = None, edits: int = 0, source: str = "replay") -> list[dict[str, Any]]:
    """The retention metrics after each promotion (the ledger's ``retention.*``) and of the current model."""
    rows = []
    for e in entries:
        m = e.get("metrics") or {}
        rows.append({"version": e["version"], "edits_so_far": e.get("edits_so_far", 0),
                     **{c: m.get(f"retention.{c}", "") for c in RETENTION_COLUMNS}, "source": "ledger"})
    if current is not None:
        rows.append({"version": version or "base", "edits_so_far": edits,
                     **{c: "" if current.get(c) is None else current[c] for c in RETENTION_COLUMNS},
                     "source": source})
    return rows


def write_csv(path: Path, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(header), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- DVC -------------------------------------------------------------------------------------------

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


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """Replace ``dst`` with a copy of the checkpoint folder ``src`` (assembled aside, then renamed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        for name in ("deltas.safetensors", "state.safetensors", "manifest.json"):
            shutil.copy2(src / name, tmp / name)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    _copy_checkpoint(ckpt, repo / CHAMPION_DIR)
    lineage = ledger.lineage(version)
    machine = machine_info()
    record = {"version": version, "weights_hash": whash, "checkpoint": str(ckpt.relative_to(repo))
              if _inside(ckpt, repo) else str(ckpt), "edits": manifest.get("edit_count", entry.get("edits_so_far")),
              "batch_id": entry.get("batch_id"), "time": entry.get("time"), "machine": machine}
    write_json(repo / PROMOTION_JSON, record)
    write_json(repo / REPLAY_JSON, {
        "source": "promotion", "weights_hash": whash, "ledger_champion": version, "ledger_weights_hash": whash,
        "match": True, "edits": record["edits"], "seconds": 0.0, "machine": machine,
        "note": "written at promotion by flows.audit.audit.record_promotion; nothing was replayed: "
                "run `dvc repro --force --single-item replay` to rebuild"})
    retention = {k.removeprefix("retention."): v for k, v in (entry.get("metrics") or {}).items()
                 if k.startswith("retention.")}
    write_json(repo / METRICS_JSON, {"source": "promotion", "version": version, "weights_hash": whash,
                                     "edits": record["edits"], **retention})
    write_csv(repo / NORMS_CSV, NORMS_HEADER, norms_rows(lineage))
    write_csv(repo / RETENTION_CSV, RETENTION_HEADER, retention_rows(lineage))
    return record


def _dvc_sync_here(add: Sequence[str], push: bool) -> list[str]:
    """In the repository's folder (DVC resolves targets against the working directory): dvc add
    ``add``, dvc commit -f every stage, dvc push to the default remote. Returns the problems met."""
    from dvc.repo import Repo

    problems: list[str] = []
    with Repo(".") as dvc:
        if add:
            try:
                dvc.add(list(add))
            except Exception as err:  # every DVC failure is reported, none is fatal
                problems.append(f"dvc add {' '.join(add)}: {err}")
        present = {getattr(s, "name", None) for s in dvc.index.stages}
        for stage in STAGES:
            if stage not in present:
                problems.append(f"note: dvc.yaml has no stage {stage}")
                continue
            try:
                dvc.commit(f"dvc.yaml:{stage}", force=True)
            except Exception as err:
                problems.append(f"dvc commit {stage}: {err}")
        if push:
            remote = dvc.config.get("core", {}).get("remote")
            if not remote:
                log.warning("no default DVC remote: not pushing (dvc remote add -d %s %s)", REMOTE_NAME, REMOTE_URL)
            else:
                try:
                    dvc.push()
                except Exception as err:
                    problems.append(f"dvc push to {remote}: {err}")
    return problems


def _dvc_sync(params: Params, push: bool) -> list[str]:
    """:func:`_dvc_sync_here` in a child process running in ``repo`` (never the flow's own
    working directory, and DVC's state stays out of the flow's process)."""
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
    cmd = [sys.executable, "-m", "flows.audit.audit", "--dvc-sync", *(["--no-push"] if not push else []), "--", *add]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
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


# --- the verdict -------------------------------------------------------------------------------------

REPRODUCED, MISMATCH, NOT_REPLAYED, STALE = "reproduced", "MISMATCH", "NOT REPLAYED", "STALE"

SAME_MACHINE_NOTE = ("bit-identical rebuilds are expected on the same machine type and software; a different "
                     "CPU, BLAS/LAPACK, torch version or thread count can change the last bits")


@dataclass(frozen=True)
class AuditResult:
    """The audit's verdict with both hashes and the machine facts at promotion and replay."""

    verdict: str
    champion: str | None
    ledger_weights_hash: str | None
    replay_weights_hash: str | None
    machine_at_promotion: dict[str, Any] | None
    machine_at_replay: dict[str, Any] | None
    machine_differences: dict[str, tuple[Any, Any]]
    explanation: str
    replay: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.verdict == REPRODUCED

    def render(self) -> str:
        lines = [f"verdict: {self.verdict}",
                 f"champion: {self.champion or 'base model (no promotion yet)'}",
                 f"ledger weights hash: {self.ledger_weights_hash}",
                 f"replay weights hash: {self.replay_weights_hash}"]
        if self.machine_differences:
            lines.append("machine at promotion vs replay differs in:")
            lines += [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in self.machine_differences.items()]
        elif self.machine_at_promotion and self.machine_at_replay:
            m = self.machine_at_replay
            lines.append(f"same machine facts at promotion and replay: torch {m.get('torch')}, {m.get('cpu_model')} "
                         f"({m.get('cpu_capability')}), BLAS {m.get('blas')}, {m.get('threads')} threads, "
                         f"{m.get('device')} {m.get('dtype')}")
        lines.append(self.explanation)
        return "\n".join(lines)


def audit(params: Params) -> AuditResult:
    """Compare what ``dvc repro`` rebuilt (replay.json) with the ledger's champion.

    Verdicts: ``reproduced`` (same weights hash), ``MISMATCH`` (different; the machine
    differences explain it or not), ``NOT REPLAYED`` (replay.json is missing or was written
    at promotion: run the replay), ``STALE`` (the replay rebuilt another champion than the
    ledger's current one).
    """
    repo = params.root
    ledger = Ledger(params.roots.ledger)
    version, whash = champion_of(ledger)
    replay = read_json(repo / REPLAY_JSON)
    promotion = read_json(repo / PROMOTION_JSON)
    at_promotion = None
    if promotion and promotion.get("version") == version:
        at_promotion = promotion.get("machine")
    if at_promotion is None and version is not None:
        at_promotion = (ledger.promotion(version) or {}).get("machine")
    at_replay = replay.get("machine") if replay else None
    rebuilt = replay.get("weights_hash") if replay else None
    diffs = machine_differences(at_promotion, at_replay)

    def result(verdict: str, explanation: str) -> AuditResult:
        return AuditResult(verdict, version, whash, rebuilt, at_promotion, at_replay, diffs, explanation, replay)

    if replay is None:
        return result(NOT_REPLAYED, f"{REPLAY_JSON} is missing: run `dvc repro --force --single-item replay`")
    if replay.get("source") != "replay":
        return result(NOT_REPLAYED, f"{REPLAY_JSON} was written at promotion, nothing was rebuilt: run "
                                    "`dvc repro --force --single-item replay` (or `nas audit --repro`)")
    if replay.get("ledger_champion") != version:
        return result(STALE, f"the replay rebuilt {replay.get('ledger_champion') or 'the base model'}, but the "
                             f"ledger's champion is {version or 'the base model'}: run the replay again")
    if version is not None and rebuilt == whash:
        note = ("reproduced bit for bit even though the machine facts differ" if diffs else
                "reproduced bit for bit" + ("" if at_promotion else " (the promotion's machine facts were "
                                            "not recorded)"))
        return result(REPRODUCED, note)
    if version is None:
        return result(REPRODUCED, "no promotion yet: the replay is the base model")
    if diffs:
        return result(MISMATCH, "the rebuilt weights differ from the promoted ones, and the machine differs in "
                                f"{', '.join(diffs)}: {SAME_MACHINE_NOTE}. Replay on the promotion's machine type "
                                "to tell a machine effect from a real discrepancy.")
    if at_promotion is None:
        return result(MISMATCH, "the rebuilt weights differ from the promoted ones; the promotion's machine facts "
                                f"were not recorded, so a machine effect cannot be ruled out ({SAME_MACHINE_NOTE})")
    first = next((b for b in replay.get("versions", []) if not b.get("match")), None)
    where = f" The first divergence is at {first['version']}." if first else ""
    return result(MISMATCH, "the rebuilt weights differ from the promoted ones on the same machine facts: the "
                            "ledger, the accepted batches, params.yaml, the model config or the code differ from "
                            f"what the nightly flow used.{where}")


# --- command line ------------------------------------------------------------------------------------

def repro(repo: Path) -> None:
    """``dvc repro --force --single-item replay`` then ``dvc repro evaluate``, with this Python on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for args in (["repro", "--force", "--single-item", "replay"], ["repro", "evaluate"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.audit.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=None, help="the project directory (default: the working one)")
    parser.add_argument("--repro", action="store_true", help="run the replay and evaluate stages first")
    parser.add_argument("--record", action="store_true", help="record the current champion (record_promotion)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--dvc-sync", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-push", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("add", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dvc_sync:  # the child process of record_promotion, in the repository's folder
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        problems = _dvc_sync_here(args.add, not args.no_push)
        sys.stdout.write(json.dumps({"problems": problems}) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.record:
        problems = record_promotion(load_params(project=args.repo))
        for p in problems:
            log.warning("DVC audit: %s", p)
        return 1 if problems else 0
    if args.repro:
        repro(project_root(args.repo))
    res = audit(load_params(project=args.repo))
    if args.json:
        doc = {k: v for k, v in res.__dict__.items() if k != "replay"}
        sys.stdout.write(json.dumps(doc, indent=1, default=str) + "\n")
    else:
        sys.stdout.write(res.render() + "\n")
    return 0 if res.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
