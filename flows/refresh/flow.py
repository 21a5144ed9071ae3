"""The nightly refresh: validate -> edit the champion with NAS -> evaluate -> gate -> promote or quarantine.

``nas refresh`` runs :func:`nightly_refresh` once (one Prefect flow run per night) over
every batch in the inbox, in name order. For each batch:

1. **validate** (Great Expectations suite + tokenizer checks + ledger conflicts); a failing
   batch is moved untouched to ``quarantine/BATCH/`` with its report and ``reason.json``;
2. **edit** the champion (loaded once per night) with the configured method + NAS;
3. **evaluate** the new batch, retention over every accepted edit, canary perplexity,
   general tasks and weight norms;
4. **gate** with the collapse verdict plus the promotion thresholds of params.yaml;
5. on pass, write checkpoint ``vNNNN``, register it in MLflow and move the ``champion``
   alias, append the ledger, move the batch to ``accepted/``; on fail, restore the
   champion's weights in memory, quarantine the batch with the failed checks and tag the
   MLflow run rejected.

The ledger (``flows.ledger.records``) is the source of truth: the MLflow alias is re-synced to it
at the start of every run, and a batch whose file hash is already in the champion's
lineage is never applied again. Writes are atomic, and a lock file keeps two refreshes
from editing at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.audit.audit import held_facts, lineage_batches, machine_info, record_promotion, retention_set
from flows.config.params import Params, load_params
from flows.engine import editing, evaluation
from flows.engine.checkpoints import file_hashes, write_checkpoint
from flows.engine.loading import base_anchor, base_stats, load_base
from flows.facts.inbox import BatchSnapshot, InboxScan, NotARegularFile, release, scan_inbox, store, take_snapshot
from flows.facts.validate import BatchValidation, LedgerFact, batch_id_for, quarantine, validate_batch, write_report
from flows.io import code_version, sha256_file
from flows.ledger.records import Ledger
from flows.tracking.names import registered_model_name
from flows.tracking.plots import norm_plot
from flows.tracking.rebuild import PromotedCheckpoint
from flows.tracking.tracker import Tracker
from flows.tracking.uris import resolve_tracking_uri
from nas_core.collapse import Check, forecast, norm_ratios
from nas_core.evaluate.counterfact import edit_metrics
from nas_core.requests import EditRequest


class RefreshLocked(RuntimeError):
    """Another refresh holds the lock."""


@contextmanager
def refresh_lock(path: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``path`` for the whole night (released by the OS on a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(encoding="utf-8").strip() or "unknown"
            raise RefreshLocked(f"another refresh is running (lock {path} held by {holder}); not editing") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)


def next_version(checkpoints: Path) -> str:
    """``vNNNN`` one past the highest existing checkpoint folder (orphans from a crash included)."""
    numbers = [int(p.name[1:]) for p in checkpoints.glob("v[0-9][0-9][0-9][0-9]") if p.name[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1:04d}"


def tidy_checkpoints(checkpoints: Path, ledger: Ledger) -> tuple[list[str], list[str]]:
    """Remove the half-written folders a killed checkpoint write leaves (``.vNNNN.tmp-*``,
    ``.vNNNN.old-*``) and list orphans (complete ``vNNNN`` folders the ledger never promoted).

    Call it under the refresh lock only (no write can be in flight then). Orphans stay where
    they are: their numbers are never reused (:func:`next_version` counts them) and an
    operator may want to look at them. Returns ``(removed, orphans)``.
    """
    if not checkpoints.is_dir():
        return [], []
    removed = []
    for p in sorted(checkpoints.glob(".v[0-9]*")):
        if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p)
            removed.append(p.name)
    promoted = {e["version"] for e in ledger.promotions()}
    orphans = sorted(p.name for p in checkpoints.glob("v[0-9][0-9][0-9][0-9]") if p.is_dir() and p.name not in promoted)
    return removed, orphans


def free_target(path: Path, folder: Path) -> Path:
    """Where ``path`` would go in ``folder`` without overwriting anything (``name-2.jsonl`` etc.)."""
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / path.name, 2
    while target.exists():
        target, n = folder / f"{path.stem}-{n}{path.suffix}", n + 1
    return target


# --- what the champion knows ------------------------------------------------------------------

def lineage_requests(ledger: Ledger, version: str | None, params: Params) -> tuple[list[EditRequest], list[LedgerFact]]:
    """Every request the champion holds and its ledger facts: ``flows.audit.audit.held_facts`` of the
    lineage, each accepted batch checked against the ledger's hash (the audit's own code)."""
    batches = lineage_batches(ledger, version, params.roots, params.edit.batch_size, params.validation.schema_policy())
    pairs = held_facts(batches, params.validation.fold_confusables)
    return [r for r, _ in pairs], [LedgerFact.from_request(r, b) for r, b in pairs]


# --- gate ---------------------------------------------------------------------------------------

def gate(batch: dict[str, Any], retention: dict[str, Any], collapse_checks: tuple[Check, ...], skipped_fraction: float,
         params: Params) -> tuple[Check, ...]:
    """The collapse verdict's checks plus the promotion thresholds; the batch passes if all pass."""
    p = params.promotion
    checks = list(collapse_checks)

    def at_least(name: str, value: float | None, limit: float, what: str) -> None:
        if value is not None:
            checks.append(Check(name, value, limit, value >= limit, f"{what} {value:.1f} < {limit:g}"))

    at_least("batch_efficacy", batch.get("efficacy_success"), p.min_batch_efficacy, "new batch efficacy")
    at_least("batch_generalisation", batch.get("generalisation_success"), p.min_batch_generalisation,
             "new batch generalisation")
    at_least("batch_specificity", batch.get("specificity_success"), p.min_batch_specificity, "new batch specificity")
    at_least("retention_efficacy", retention.get("efficacy_success"), p.min_retention_efficacy,
             "efficacy over all accepted edits")
    growth = retention.get("norm_growth_per_edit")
    if growth is not None:
        checks.append(Check("norm_growth_per_edit", growth, p.max_norm_growth_per_edit,
                            growth <= p.max_norm_growth_per_edit,
                            f"norm growth {growth:.4f}/edit > {p.max_norm_growth_per_edit:g}"))
    checks.append(Check("skipped_fraction", skipped_fraction, p.max_skipped_fraction,
                        skipped_fraction <= p.max_skipped_fraction,
                        f"NAS skipped {skipped_fraction:.0%} of the batch > {p.max_skipped_fraction:.0%}"))
    return tuple(checks)


# --- tasks --------------------------------------------------------------------------------------

@task(retries=3, retry_delay_seconds=2)
def connect_tracking(params: Params) -> Tracker:
    """Open the MLflow store (retried: a store that is briefly down should not fail the night)."""
    tracker = Tracker(resolve_tracking_uri(params.tracking.uri or None, params.root), params.tracking.experiment)
    tracker.healthcheck()
    return tracker


@task(retries=2, retry_delay_seconds=1)
def inbox_batches(inbox: Path) -> InboxScan:
    """The inbox's batches; what is not a batch is logged and left alone."""
    scan = scan_inbox(inbox)
    for item in scan.ignored:
        get_run_logger().warning("inbox entry %r is not a batch (%s): left alone", item.name, item.why)
    return scan


@task(cache_policy=NO_CACHE)
def load_champion(params: Params, ledger: Ledger) -> dict[str, Any]:
    """Load the base model once, its statistics and anchor, and the champion checkpoint on top."""
    from nas_core.deltas import weights_hash

    logger = get_run_logger()
    s = params.method_settings()
    base = load_base(params)
    cov = base_stats(base, params, logger)
    anchor = base_anchor(base, params, s, logger)
    base_ref = evaluation.base_reference(base.model, base.tok, base.name, base.base_hash, params.model_config().eval,
                                         params.roots)
    champ = ledger.champion()
    ckpt = None
    if champ is not None:
        ckpt = params.roots.checkpoints / champ["version"]
        if not (ckpt / "manifest.json").is_file():
            raise FileNotFoundError(f"the champion's checkpoint {ckpt} is missing: restore it with "
                                    "`dvc pull data/checkpoints.dvc`")
        logger.info("champion %s (%d edits) from %s", champ["version"], champ.get("edits_so_far", 0), ckpt)
    else:
        logger.info("no champion yet: starting from the base model %s", base.name)
    promo = ledger.promotion(champ["version"]) if champ is not None else None
    session = editing.open_session(base.model, base.tok, base.name, params.edit.method, s, cov, base.base_hash,
                                   anchor, ckpt, promo.files if promo is not None else None)
    if champ is not None and weights_hash(base.model) != champ["weights_hash"]:
        raise RuntimeError(f"champion {champ['version']} rebuilt to weights {weights_hash(base.model)[:12]}, but the "
                           f"ledger recorded {champ['weights_hash'][:12]}: the checkpoint folder was altered")
    return {"session": session, "base_ref": base_ref, "champion": champ, "base_hash": base.base_hash,
            "name": base.name}


def check_batch(source: Path | BatchSnapshot, tok, facts: list[LedgerFact], params: Params) -> BatchValidation:
    """The night's checks of one batch against the champion's facts (``nas validate`` calls this too)."""
    return validate_batch(source, tok, facts, params.validation)


def champion_facts(params: Params) -> list[LedgerFact]:
    """The facts the ledger's champion holds (what a batch's ledger checks compare against)."""
    ledger = Ledger(params.roots.ledger)
    champ = ledger.champion()
    return lineage_requests(ledger, champ["version"] if champ else None, params)[1]


@task(cache_policy=NO_CACHE)
def validate(snap: BatchSnapshot, tok, facts: list[LedgerFact], params: Params, report_dir: Path) -> BatchValidation:
    result = check_batch(snap, tok, facts, params)
    write_report(result, report_dir)
    return result


@task(cache_policy=NO_CACHE)
def edit(session: editing.EditSession, requests: list[EditRequest], batch_size: int) -> list[dict[str, Any]]:
    """Apply the batch in sequential sub-batches; returns the per-request diagnostics."""
    return editing.apply_in_batches(session, requests, batch_size, get_run_logger())


@task(cache_policy=NO_CACHE)
def evaluate_candidate(session: editing.EditSession, new: list[EditRequest], retained: list[EditRequest],
                       base_ref: dict[str, Any], params: Params) -> dict[str, Any]:
    """Metrics of the edited model: the new batch alone, and retention (:func:`flows.audit.audit.retention_set`)
    + health over everything."""
    cfg = params.model_config()
    names = list(session.base)
    ratios = norm_ratios(editing.frobenius_norms(session.model, names), session.original_norms)
    batch = edit_metrics(session.model, session.tok, new, cfg.eval.batch_size, cfg.eval.batch_tokens).as_dict()
    retention, result = evaluation.evaluate(session.model, session.tok, retained, cfg.eval, base_ref, params.roots,
                                            ratios, session.state.edit_count, cfg.collapse)
    return {"batch": batch, "retention": retention, "collapse_checks": result.checks, "norm_ratios": ratios}


# --- the flow -----------------------------------------------------------------------------------

def _flat_metrics(outcome: dict[str, Any], diagnostics: list[dict[str, Any]]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for prefix in ("batch", "retention"):
        for k, v in outcome[prefix].items():
            if isinstance(v, int | float) and v is not None:
                flat[f"{prefix}.{k}"] = float(v)
    before = [d["v_norm_before"] for d in diagnostics]
    after = [d["v_norm_after"] for d in diagnostics if not d["skipped"]]
    flat["v_norm_before_mean"] = sum(before) / len(before) if before else 0.0
    flat["v_norm_before_max"] = max(before, default=0.0)
    flat["v_norm_after_mean"] = sum(after) / len(after) if after else 0.0
    flat["skipped"] = float(sum(d["skipped"] for d in diagnostics))
    return flat


def lineage_forecast(ledger: Ledger, version: str | None, bound: float, current: dict[str, float] | None = None,
                     edits: int = 0) -> dict[str, float | None]:
    """The norm forecast of ``version``'s lineage (plus a candidate's ``current`` ratios at
    ``edits``): further edits before ``bound`` by a linear and an exponential fit, the worse,
    and the nights that is at the lineage's mean edits per night."""
    lineage = ledger.lineage(version) if version else []
    history = [(0, 1.0)] + [(e["edits_so_far"], max((e.get("norm_ratios") or {"": 1.0}).values())) for e in lineage]
    nights = len(lineage)
    if current:
        history.append((edits, max(current.values())))
        nights += 1
    f = forecast(history, bound)
    per_night = history[-1][0] / nights if nights else 0
    worst = f.worst
    return {"edits_left_linear": f.linear, "edits_left_exponential": f.exponential, "edits_left": worst,
            "nights_left": worst / per_night if worst is not None and per_night else None}


def _norm_history(ledger: Ledger, version: str | None, current: dict[str, float], edits: int) -> dict[str, list]:
    history: dict[str, list] = {}
    for entry in ledger.lineage(version) if version else []:
        for name, r in entry.get("norm_ratios", {}).items():
            history.setdefault(name, [(0, 1.0)]).append((entry["edits_so_far"], r))
    for name, r in current.items():
        history.setdefault(name, [(0, 1.0)]).append((edits, r))
    return history


def process_batch(path: Path, params: Params, ledger: Ledger, tracker: Tracker, loaded: dict[str, Any]) -> dict:
    """One batch through validate -> edit -> evaluate -> gate -> promote/quarantine."""
    logger = get_run_logger()
    roots = params.roots
    session: editing.EditSession = loaded["session"]
    champ = ledger.champion()
    # The night reads the file once: these bytes are validated, edited, hashed into the
    # ledger and stored in accepted/ or quarantine, whatever happens to the file meanwhile.
    snap = take_snapshot(path, params.validation.max_file_bytes)
    file_hash = snap.sha256
    lineage = ledger.lineage(champ["version"]) if champ else []
    done = next((e for e in lineage if e["file_sha256"] == file_hash), None)
    if done is not None:
        recorded = roots.resolve(done["accepted_path"])
        # A crash after the ledger's promote line: finish that promotion (store, then clear the inbox).
        if recorded.is_file() and sha256_file(recorded) == file_hash:
            target = recorded
        else:
            target = recorded if not recorded.exists() else free_target(path, roots.accepted)
            store(snap, target)
        _release(snap, logger)
        logger.info("%r is already in the champion (same sha256): not applying it again; stored as %s",
                    path.name, target)
        return {"batch": path.name, "outcome": "already_applied"}
    try:
        batch_id = batch_id_for(path)
    except ValueError:
        batch_id = f"invalid-name-{file_hash[:8]}"
    report_dir = roots.reports / f"{batch_id}-{file_hash[:8]}"
    retained, facts = lineage_requests(ledger, champ["version"] if champ else None, params)
    run_id = tracker.start_batch_run(batch_id, {
        "method": params.edit.method, "nas": dataclasses.asdict(params.method_settings().nas),
        "batch_id": batch_id, "batch_sha256": file_hash, "base_weights_hash": loaded["base_hash"],
        "model": loaded["name"], "code_version": code_version(), "champion": champ["version"] if champ else "base"},
        {"batch_file": path.name})
    logger.info("validating %r (%s)", path.name, file_hash[:12])
    validation = validate(quote(snap), quote(session.tok), facts, params, report_dir)
    for f in ("validation.html", "validation.json"):
        tracker.log_artifact(run_id, report_dir / f, "validation")
    if not validation.passed:
        logger.warning("%r failed validation: %s", path.name, validation.summary())
        folder = quarantine(snap, validation, roots.quarantine,
                            {"stage": "validation", "problems": validation.problems_by_rule()})
        _warn_kept(snap, logger)
        ledger.append("quarantine", batch_id=batch_id, file_sha256=file_hash, stage="validation",
                      problems=validation.problems_by_rule(), quarantine=str(folder), mlflow_run_id=run_id)
        tracker.mark_rejected(run_id, [f"validation:{r}" for r in validation.problems_by_rule()])
        tracker.finish_run(run_id)
        return {"batch": batch_id, "outcome": "quarantined", "stage": "validation", "folder": str(folder)}

    requests = list(validation.requests)
    saved = session.snapshot()
    logger.info("%s: %d valid requests; editing %s with %s%s", batch_id, len(requests),
                champ["version"] if champ else "the base model", params.edit.method, "+NAS" if params.edit.nas else "")
    diagnostics = edit(quote(session), requests, params.edit.batch_size)
    retention = retention_set(retained, requests, params.validation.fold_confusables)
    outcome = evaluate_candidate(quote(session), requests, retention, loaded["base_ref"], params)
    skipped_fraction = sum(d["skipped"] for d in diagnostics) / len(requests)
    checks = gate(outcome["batch"], outcome["retention"], outcome["collapse_checks"], skipped_fraction, params)
    failed = [c for c in checks if not c.passed]
    flat = _flat_metrics(outcome, diagnostics)
    tracker.log_metrics(run_id, flat, step=session.state.edit_count)
    for name, r in outcome["norm_ratios"].items():
        tracker.log_metrics(run_id, {f"norm_ratio.{name}": r}, step=session.state.edit_count)
    history = _norm_history(ledger, champ["version"] if champ else None, outcome["norm_ratios"],
                            session.state.edit_count)
    png = norm_plot(history, report_dir / "norms.png", f"{batch_id}: edited weight norms", "||W_t||_F / ||W_0||_F")
    tracker.log_artifact(run_id, png, "plots")
    bound = params.model_config().collapse.max_norm_ratio
    outlook = lineage_forecast(ledger, champ["version"] if champ else None, bound, outcome["norm_ratios"],
                               session.state.edit_count)
    tracker.log_metrics(run_id, {f"forecast.{k}": v for k, v in outlook.items() if v is not None},
                        step=session.state.edit_count)
    if outlook["nights_left"] is not None and outlook["nights_left"] < params.promotion.forecast_warn_nights:
        logger.warning("%s: at the current rate the worst norm ratio reaches the bound in %.0f nights (%.0f edits; "
                       "promotion.forecast_warn_nights %g)", batch_id, outlook["nights_left"], outlook["edits_left"],
                       params.promotion.forecast_warn_nights)
        tracker.tag_run(run_id, {"forecast_warning": f"{outlook['nights_left']:.0f} nights left"})
    evaluation.write_metrics(report_dir / "metrics.json", {**flat}, verdict_of(checks), {
        "batch_id": batch_id, "batch_sha256": file_hash, "edits_so_far": session.state.edit_count})
    tracker.log_artifact(run_id, report_dir / "metrics.json")
    verdict_text = "pass" if not failed else "fail: " + "; ".join(c.message for c in failed)
    logger.info("%s gate: %s", batch_id, verdict_text)
    record = {"batch_id": batch_id, "file_sha256": file_hash, "request_ids": [d["case_id"] for d in diagnostics
                                                                              if not d["skipped"]],
              "skipped_ids": [d["case_id"] for d in diagnostics if d["skipped"]],
              "metrics": flat, "checks": [dataclasses.asdict(c) for c in checks], "mlflow_run_id": run_id,
              "edits_so_far": session.state.edit_count, "norm_ratios": outcome["norm_ratios"], "forecast": outlook}
    if failed:
        session.restore(saved)
        folder = quarantine(snap, validation, roots.quarantine,
                            {"stage": "gate", "failed_checks": [c.message for c in failed]})
        _warn_kept(snap, logger)
        ledger.append("reject", **record, failed_checks=[c.name for c in failed], quarantine=str(folder))
        tracker.mark_rejected(run_id, [c.name for c in failed])
        tracker.finish_run(run_id)
        return {"batch": batch_id, "outcome": "rejected", "failed_checks": [c.name for c in failed],
                "folder": str(folder)}

    version = next_version(roots.checkpoints)
    ckpt = write_checkpoint(session, roots.checkpoints / version,
                                    {"version": version, "batch_id": batch_id, "batch_sha256": file_hash})
    manifest = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))
    model_name = registered_model_name(loaded["name"])
    with tempfile.TemporaryDirectory() as staging:
        # The registry holds the model (deltas + manifest); the editor state stays with the checkpoint.
        for f in ("deltas.safetensors", "manifest.json"):
            shutil.copy2(ckpt / f, Path(staging) / f)
        mv = tracker.register_checkpoint(model_name, run_id, Path(staging), version,
                                         {"batch_id": batch_id, "weights_hash": manifest["weights_hash"]})
    # Ledger first, then the store: a crash in between leaves the batch in the inbox, and the next
    # night recognises it by its hash and finishes the store (a move first would lose it).
    accepted = free_target(path, roots.accepted)
    ledger.append("promote", **record, version=version, parent=champ["version"] if champ else None,
                  weights_hash=manifest["weights_hash"], checkpoint=roots.relative(ckpt),
                  accepted_path=roots.relative(accepted),
                  model_version=mv, edit_batch_size=params.edit.batch_size, machine=machine_info(session.model),
                  files=file_hashes(ckpt), compute_dtype=session.compute_dtype,
                  attention=session.attention)
    store(snap, accepted)  # the edited bytes, checked against the ledger's file_sha256
    _release(snap, logger)
    tracker.set_champion(model_name, mv)
    tracker.tag_run(run_id, {"verdict": "promoted", "version": version})
    tracker.finish_run(run_id)
    logger.info("%s promoted: champion is now %s (MLflow %s v%s), %d edits in all", batch_id, version, model_name, mv,
                session.state.edit_count)
    return {"batch": batch_id, "outcome": "promoted", "version": version, "weights_hash": manifest["weights_hash"]}


def _release(snap: BatchSnapshot, logger) -> None:
    """Clear the inbox entry whose bytes were stored (kept, with a warning, when rewritten meanwhile)."""
    kept = release(snap)
    if kept:
        logger.warning("%s", kept)


def _warn_kept(snap: BatchSnapshot, logger) -> None:
    if os.path.lexists(snap.path):
        logger.warning("%s was rewritten while the night ran: the quarantine holds the bytes the night read, the new "
                       "content stays in the inbox as a new batch", snap.name)


def verdict_of(checks: tuple[Check, ...]):
    from nas_core.collapse import Verdict

    return Verdict(tuple(checks))


def rebuild_registry(ledger: Ledger, tracker: Tracker, model: str, project: Path, checkpoints: Path) -> None:
    """Re-register the ledger's promoted versions the MLflow registry lacks (a deleted or new
    ``mlflow.db``) from their checkpoint folders, and point the alias at the champion."""
    logger = get_run_logger()
    model_name = registered_model_name(model)
    promotions = [PromotedCheckpoint.from_entry(e, project, checkpoints)
                  for e in ledger.promotions() if e.get("model", model) == model]
    if tracker.registry_lost(model_name, [p.version_label for p in promotions]):
        logger.warning("the MLflow store at %s has none of the ledger's %d promoted versions (was mlflow.db "
                       "deleted?): rebuilding the registry from the ledger", tracker.tracking_uri, len(promotions))
    champ = ledger.champion()
    rebuild = tracker.rebuild_registry(model_name, promotions, champ["version"] if champ else None)
    if rebuild.rebuilt:
        logger.warning("re-registered %s in MLflow from their checkpoint folders (runs tagged rebuilt_from_ledger)",
                       ", ".join(rebuild.rebuilt))
    if rebuild.missing or rebuild.mismatched:
        logger.warning("could not re-register in MLflow: missing checkpoint folders %s (restore with `dvc pull`); "
                       "folders holding other weights than the ledger promoted %s",
                       list(rebuild.missing), list(rebuild.mismatched))


def sync_champion_alias(ledger: Ledger, tracker: Tracker, model_name: str) -> None:
    """Point MLflow's ``champion`` alias at the ledger's champion (the ledger wins after a crash)."""
    champ = ledger.champion()
    if champ is None:
        return
    mv = tracker.version_for_label(model_name, champ["version"])
    current = tracker.champion(model_name)
    if mv is not None and (current is None or current.version != mv):
        tracker.set_champion(model_name, mv)
        get_run_logger().warning("MLflow champion alias re-synced to the ledger's %s (v%s)", champ["version"], mv)


@flow(name="nightly-refresh")
def nightly_refresh(params_file: str | None = None, project: str | None = None) -> list[dict[str, Any]]:
    """One night: every inbox batch through validate -> edit -> evaluate -> gate.

    ``project`` is the project directory (:func:`flows.paths.project_root`; params.yaml there
    unless ``params_file`` is given)."""
    logger = get_run_logger()
    params = load_params(Path(params_file) if params_file else None, Path(project) if project else None)
    roots = params.roots
    ledger = Ledger(roots.ledger)
    with refresh_lock(roots.ledger.with_name(".refresh.lock")):
        batches = list(inbox_batches(roots.inbox).batches)
        if not batches:
            logger.info("inbox %s is empty: nothing to do tonight", roots.inbox)
            return []
        logger.info("%d batch(es) in the inbox: %s", len(batches), ", ".join(repr(p.name) for p in batches))
        removed, orphans = tidy_checkpoints(roots.checkpoints, ledger)
        for name in removed:
            logger.warning("removed %r: a checkpoint write that was killed half-way", name)
        if orphans:
            logger.warning("checkpoints the ledger never promoted (a crash after the write; left in place, "
                           "numbers not reused): %s", ", ".join(orphans))
        tracker = connect_tracking(params)
        # Under the lock no other night is writing: a RUNNING run is a killed night's leftover.
        for run_id in tracker.close_orphaned_runs("its night's process died before the run was closed"):
            logger.warning("MLflow run %s was left RUNNING by a killed night: marked KILLED", run_id)
        loaded = load_champion(params, ledger)
        rebuild_registry(ledger, tracker, loaded["name"], roots.project, roots.checkpoints)
        sync_champion_alias(ledger, tracker, registered_model_name(loaded["name"]))
        results = []
        for path in batches:
            try:
                results.append(process_batch(path, params, ledger, tracker, loaded))
            except (FileNotFoundError, IsADirectoryError, NotARegularFile) as err:
                # The entry vanished or changed kind since the scan (a link whose target went,
                # an upload renamed away): nothing was read or edited; the rest of the night goes on.
                logger.warning("inbox entry %r could not be read as a batch (%s): left alone", path.name, err)
                results.append({"batch": path.name, "outcome": "unreadable"})
        if any(r["outcome"] in ("promoted", "rejected", "quarantined") for r in results):
            record_audit(params)
        return results


@task(name="record-dvc-audit", cache_policy=NO_CACHE)
def record_audit(params: Params) -> None:
    """Record the night's ledger, batches and champion in DVC (``flows.audit.audit.record_promotion``),
    so that ``dvc status`` is clean afterwards and ``dvc repro`` can rebuild the champion.

    Never fails the night (the promotion already stands): problems are warnings. A ledger
    outside the repository (a scratch or test run) is not recorded."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    problems = record_promotion(params)
    for problem in problems:
        logger.warning("DVC audit: %s", problem)
    logger.info("DVC audit record: %s in %.1f s", "done" if not problems else f"{len(problems)} problem(s)",
                time.perf_counter() - t0)
