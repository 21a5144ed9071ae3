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
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.audit.record import record_promotion
from flows.config.params import Params, load_params
from flows.engine.memory import returning_freed_memory
from flows.facts.batch import batch_id_for
from flows.facts.inbox import NotARegularFile, store, take_snapshot
from flows.io import code_version, free_target, sha256_file
from flows.ledger.lineage import retention_set
from flows.ledger.records import Ledger
from flows.refresh import steps
from flows.refresh.lock import model_slot, refresh_lock
from flows.refresh.steps import BatchOutcome, Champion, NightBatch
from flows.refresh.versions import ROLLBACK_PREFIX, tidy_checkpoints
from flows.tracking import review
from flows.tracking.names import registered_model_name
from flows.tracking.rebuild import PromotedCheckpoint
from flows.tracking.tracker_process import AnyTracker


def process_batch(path: Path, params: Params, ledger: Ledger, tracker: AnyTracker, champion: Champion) -> BatchOutcome:
    """One batch through validate -> edit -> evaluate -> gate -> promote | reject (| quarantine)."""
    logger = get_run_logger()
    session = champion.session
    # The night reads the file once: these bytes are validated, edited, hashed into the
    # ledger and stored in accepted/ or quarantine, whatever happens to the file meanwhile.
    snap = take_snapshot(path, params.validation.max_file_bytes)
    if (done := _already_applied(snap, params, ledger)) is not None:
        return done
    champ = ledger.champion()  # after a promotion earlier tonight, that one
    version = champ.version if champ is not None else None
    retained, facts = steps.lineage_requests(ledger, version, params)
    nb = _start(snap, params, tracker, champion, version)
    logger.info("validating %r (%s)", path.name, snap.sha256[:12])
    validation = steps.validate(quote(snap), quote(session.tok), facts, params, nb.report_dir)
    for f in ("validation.html", "validation.json"):
        tracker.log_artifact(nb.run_id, nb.report_dir / f, "validation")
    tracker.log_batch_input(nb.run_id, nb.batch_id, snap.path, snap.sha256, review.batch_columns(validation.requests))
    if not validation.passed:
        return steps.quarantine_invalid(quote(nb), quote(validation), ledger, params, tracker)
    # The champion's editor state as it was, for a rejection: on disk beside the checkpoints, not in memory.
    params.roots.checkpoints.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=ROLLBACK_PREFIX, dir=params.roots.checkpoints) as rollback:
        saved = session.snapshot(spill=Path(rollback) / "inverses.safetensors")
        return _edit_and_decide(nb, validation, saved, retained, version, params, ledger, tracker, champion)


def _edit_and_decide(nb: NightBatch, validation, saved, retained: list, version: str | None, params: Params,
                     ledger: Ledger, tracker: AnyTracker, champion: Champion) -> BatchOutcome:
    """Edit a valid batch, evaluate it, gate it, then promote it or roll the session back to ``saved``."""
    session = champion.session
    requests = list(validation.requests)
    get_run_logger().info("%s: %d valid requests; editing %s with %s%s", nb.batch_id, len(requests),
                          version or "the base model", params.edit.method, "+NAS" if params.edit.nas else "")
    before = steps.answers(quote(session), requests, params)
    with returning_freed_memory(params.runtime.heap_trim_every_s):  # the night's peak is in these two
        diagnostics = steps.edit(quote(session), requests, params.edit.batch_size)
        retention = retention_set(retained, requests, params.validation.fold_confusables)
        candidate = steps.evaluate(quote(session), requests, retention, champion.base_ref, params, before)
    result = steps.judge(quote(nb), candidate, diagnostics, session.state.edit_count, ledger, version, params,
                         tracker)
    if result.failed:
        return steps.reject(quote(nb), quote(validation), result, quote(session), quote(saved), ledger, params, tracker)
    return steps.promote(quote(nb), result, quote(champion), version, ledger, params, tracker)


def _already_applied(snap, params: Params, ledger: Ledger) -> BatchOutcome | None:
    """A batch whose bytes are already in the champion's lineage is never applied again; a crash
    after the ledger's promote line is finished here (the bytes stored, then the inbox cleared)."""
    champ = ledger.champion()
    lineage = ledger.lineage(champ.version) if champ else []
    done = next((e for e in lineage if e["file_sha256"] == snap.sha256), None)
    if done is None:
        return None
    recorded = params.roots.resolve(done["accepted_path"])
    if recorded.is_file() and sha256_file(recorded) == snap.sha256:
        target = recorded
    else:
        target = recorded if not recorded.exists() else free_target(snap.path, params.roots.accepted)
        store(snap, target)
    steps.release_stored(snap)
    get_run_logger().info("%r is already in the champion (same sha256): not applying it again; stored as %s",
                          snap.name, target)
    return BatchOutcome(snap.name, "already_applied")


def _start(snap, params: Params, tracker: AnyTracker, champion: Champion, version: str | None) -> NightBatch:
    """The batch's id (``invalid-name-HASH`` for a bad file name), report folder and MLflow run."""
    try:
        batch_id = batch_id_for(snap.path)
    except ValueError:
        batch_id = f"invalid-name-{snap.sha256[:8]}"
    report_dir = params.roots.reports / f"{batch_id}-{snap.sha256[:8]}"
    run_id = tracker.start_batch_run(batch_id, {
        "method": params.edit.method, "nas": dataclasses.asdict(params.method_settings().nas),
        "batch_id": batch_id, "batch_sha256": snap.sha256, "base_weights_hash": champion.base_hash,
        "model": champion.name, "code_version": code_version(), "champion": version or "base"},
        {"batch_file": snap.name})
    return NightBatch(snap, batch_id, report_dir, run_id)


def rebuild_registry(ledger: Ledger, tracker: AnyTracker, model: str, project: Path, checkpoints: Path) -> None:
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


def sync_champion_alias(ledger: Ledger, tracker: AnyTracker, model_name: str) -> None:
    """Point MLflow's ``champion`` alias at the ledger's champion (the ledger wins after a crash)."""
    champ = ledger.champion()
    if champ is None:
        return
    mv = tracker.version_for_label(model_name, champ["version"])
    current = tracker.champion(model_name)
    if mv is not None and (current is None or current.version != mv):
        tracker.set_champion(model_name, mv)
        get_run_logger().warning("MLflow champion alias re-synced to the ledger's %s (v%s)", champ["version"], mv)


def _batches_on_champion(batches: list[Path], params: Params, ledger: Ledger,
                         tracker: AnyTracker) -> list[BatchOutcome]:
    """Load the champion once, bring MLflow in line with the ledger, then every batch in order."""
    logger = get_run_logger()
    roots = params.roots
    # Under the lock no other night is writing: a RUNNING run is a killed night's leftover.
    for run_id in tracker.close_orphaned_runs("its night's process died before the run was closed"):
        logger.warning("MLflow run %s was left RUNNING by a killed night: marked KILLED", run_id)
    champion = steps.load_champion(params, ledger)
    rebuild_registry(ledger, tracker, champion.name, roots.project, roots.checkpoints)
    sync_champion_alias(ledger, tracker, registered_model_name(champion.name))
    results = []
    for path in batches:
        try:
            results.append(process_batch(path, params, ledger, tracker, champion))
        except (FileNotFoundError, IsADirectoryError, NotARegularFile) as err:
            # The entry vanished or changed kind since the scan (a link whose target went,
            # an upload renamed away): nothing was read or edited; the rest of the night goes on.
            logger.warning("inbox entry %r could not be read as a batch (%s): left alone", path.name, err)
            results.append(BatchOutcome(path.name, "unreadable"))
    return results


@flow(name="nightly-refresh")
def nightly_refresh(params_file: str | None = None, project: str | None = None) -> list[BatchOutcome]:
    """One night: every inbox batch through validate -> edit -> evaluate -> gate.

    ``project`` is the project directory (:func:`flows.paths.project_root`; params.yaml there
    unless ``params_file`` is given)."""
    logger = get_run_logger()
    params = load_params(Path(params_file) if params_file else None, Path(project) if project else None)
    roots = params.roots
    ledger = Ledger(roots.ledger)
    lock = params.lock
    slot = model_slot(params.model, lock.wait_s, lock.lease_s) if lock.prefect_slot else nullcontext()
    with refresh_lock(roots.ledger.with_name(".refresh.lock")), slot:
        if params.sources:
            steps.pull_batches(params, ledger)
        batches = list(steps.inbox_batches(roots.inbox).batches)
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
        with steps.connect_tracking(params) as tracker:
            results = _batches_on_champion(batches, params, ledger, tracker)
        if any(r.outcome in ("promoted", "rejected", "quarantined") for r in results):
            record_audit(params)
        return results


@task(name="record-dvc-audit", cache_policy=NO_CACHE)
def record_audit(params: Params) -> None:
    """Record the night's ledger, batches and champion in DVC (``flows.audit.record.record_promotion``),
    so that ``dvc status`` is clean afterwards and ``dvc repro`` can rebuild the champion.

    Never fails the night (the promotion already stands): problems are warnings. A ledger
    outside the repository (a scratch or test run) is not recorded."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    problems = record_promotion(params, git_commit=params.audit.commit_pointers)
    for problem in problems:
        logger.warning("DVC audit: %s", problem)
    logger.info("DVC audit record: %s in %.1f s", "done" if not problems else f"{len(problems)} problem(s)",
                time.perf_counter() - t0)
