"""The night's steps, each a Prefect task, so the UI shows where a night spent its time and failed.

load the champion -> per batch: validate -> edit -> evaluate -> gate -> promote | reject
(| quarantine after a failed validation). Each step takes and returns typed values; the
wiring is :mod:`flows.refresh.flow`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.audit.machine import machine_info
from flows.config.params import Params
from flows.engine import evaluation
from flows.engine.base import load_base
from flows.engine.checkpoints import file_hashes, registry_files, write_checkpoint
from flows.engine.editing import EditSession, SessionSnapshot, apply_in_batches, open_session
from flows.engine.loading import base_anchor, base_stats, night_inputs
from flows.engine.memory import return_freed_memory
from flows.engine.shards import scorer_for
from flows.engine.workers import ident_for
from flows.facts.batch import BatchValidation, problems_line
from flows.facts.gx_process import shared_suite
from flows.facts.inbox import BatchSnapshot, InboxScan, release, scan_inbox, store
from flows.facts.pull import Pulled, pull_source
from flows.facts.quarantine import quarantine
from flows.facts.report import write_report
from flows.facts.validate import validate_batch
from flows.io import free_target
from flows.ledger.facts import LedgerFact
from flows.ledger.lineage import champion_of, held_facts, lineage_batches
from flows.ledger.norms import lineage_forecast, norm_history
from flows.ledger.records import Ledger
from flows.refresh.gate import flat_metrics, gate, verdict_of
from flows.refresh.operations import open_tracker
from flows.refresh.versions import next_version
from flows.tracking import review
from flows.tracking.names import registered_model_name
from flows.tracking.tracker_process import AnyTracker
from nas_core.collapse import Check, norm_ratios
from nas_core.deltas import frobenius_norms, weights_hash
from nas_core.evaluate.counterfact import FactScore, edit_metrics_and_facts
from nas_core.evaluate.fluency import greedy_generations
from nas_core.fingerprint import fingerprints
from nas_core.requests import EditRequest


@dataclass
class Champion:
    """What a night edits: the model loaded once (the champion's weights, then each promoted
    batch's on top), with the base model's references. The ledger says which version it is."""

    session: EditSession
    base_ref: dict[str, Any]
    base_hash: str
    name: str
    #: :func:`flows.engine.loading.night_inputs`: the anchor and covariance the edits used.
    inputs: dict[str, Any]


@dataclass(frozen=True)
class BatchOutcome:
    """What became of one inbox batch tonight."""

    batch: str
    outcome: str  # promoted | rejected | quarantined | already_applied | unreadable
    version: str | None = None
    weights_hash: str | None = None
    stage: str | None = None
    failed_checks: tuple[str, ...] = ()
    folder: str | None = None


@dataclass(frozen=True)
class Candidate:
    """The edited model's scores: the new batch alone, retention and health over everything."""

    batch: dict[str, Any]
    retention: dict[str, Any]
    collapse_checks: tuple[Check, ...]
    norm_ratios: dict[str, float]
    #: The new facts, their greedy answers before and after the edit and their scores after.
    requests: tuple[EditRequest, ...] = ()
    answers_before: tuple[str, ...] = ()
    answers_after: tuple[str, ...] = ()
    facts: tuple[FactScore, ...] = ()


@dataclass(frozen=True)
class GateResult:
    """The gate's checks and everything the ledger line records about the candidate."""

    checks: tuple[Check, ...]
    metrics: dict[str, float]
    forecast: dict[str, float | None]
    record: dict[str, Any] = field(repr=False)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


@dataclass(frozen=True)
class NightBatch:
    """One batch in flight: its snapshot, ids, report folder and MLflow run."""

    snap: BatchSnapshot
    batch_id: str
    report_dir: Path
    run_id: str


# --- what the champion knows -----------------------------------------------------------------

def lineage_requests(ledger: Ledger, version: str | None, params: Params) -> tuple[list[EditRequest], list[LedgerFact]]:
    """Every request the champion holds and its ledger facts: :func:`flows.ledger.lineage.held_facts`
    of the lineage, each accepted batch checked against the ledger's hash (the audit's own code)."""
    batches = lineage_batches(ledger, version, params.roots, params.edit.batch_size, params.validation.schema_policy())
    pairs = held_facts(batches, params.validation.fold_confusables)
    return [r for r, _ in pairs], [LedgerFact.from_request(r, b) for r, b in pairs]


def champion_facts(params: Params) -> list[LedgerFact]:
    """The facts the ledger's champion holds (what a batch's ledger checks compare against)."""
    ledger = Ledger(params.roots.ledger)
    champ = ledger.champion()
    return lineage_requests(ledger, champ.version if champ else None, params)[1]


def check_batch(source: Path | BatchSnapshot, tok, facts: list[LedgerFact], params: Params) -> BatchValidation:
    """The night's checks of one batch against the champion's facts (``nas validate`` calls this too)."""
    return validate_batch(source, tok, facts, params.validation)


class NotABatchFile(ValueError):
    """A path given to :func:`check_files` that is not a regular file."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: not a file")
        self.path = path


def batch_tokenizer(params: Params):
    """The tokenizer of the project's model (fetched when absent): what a batch's checks tokenise with."""
    from transformers import AutoTokenizer

    from flows.assets.fetch import fetch_model

    fetched = fetch_model(params.model_config().model, params.roots.models, show_progress=False)
    return AutoTokenizer.from_pretrained(fetched.path)


def check_files(paths: list[Path], params: Params, tok=None) -> list[BatchValidation]:
    """``nas validate``: the night's checks of each file against the champion's facts, in order,
    editing and moving nothing (``tok``: default :func:`batch_tokenizer`). Raises NotABatchFile at
    the first path that is not a file."""
    tok = batch_tokenizer(params) if tok is None else tok
    facts = champion_facts(params)
    results = []
    for path in paths:
        if not path.is_file():
            raise NotABatchFile(path)
        results.append(check_batch(path, tok, facts, params))
    return results


# --- steps -----------------------------------------------------------------------------------

@task(retries=3, retry_delay_seconds=2)
def connect_tracking(params: Params) -> AnyTracker:
    """Open the MLflow store in a child process (retried: a store that is briefly down should not
    fail the night). The caller closes it."""
    tracker = open_tracker(params, in_child=True)
    try:
        tracker.healthcheck()
    except BaseException:
        tracker.close()
        raise
    return tracker


@task(name="pull", cache_policy=NO_CACHE)
def pull_batches(params: Params, ledger: Ledger) -> list[Pulled]:
    """New batches of every configured source into the inbox, each with a ``pull`` line in the ledger."""
    logger = get_run_logger()
    pulled = []
    for source in params.sources:
        got = pull_source(source, params.roots.inbox, ledger, params.validation.max_file_bytes)
        logger.info("source %r: %d new batch(es)%s", source.name, len(got),
                    ": " + ", ".join(f"{p.path} -> {p.inbox_name}" for p in got) if got else "")
        pulled += got
    return pulled


@task(retries=2, retry_delay_seconds=1)
def inbox_batches(inbox: Path) -> InboxScan:
    """The inbox's batches; what is not a batch is logged and left alone."""
    scan = scan_inbox(inbox)
    for item in scan.ignored:
        get_run_logger().warning("inbox entry %r is not a batch (%s): left alone", item.name, item.why)
    return scan


@task(cache_policy=NO_CACHE)
def load_champion(params: Params, ledger: Ledger) -> Champion:
    """Load the base model once, its statistics and anchor, and the champion checkpoint on top."""
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
        ckpt = params.roots.checkpoints / champ.version
        if not (ckpt / "manifest.json").is_file():
            raise FileNotFoundError(f"the champion's checkpoint {ckpt} is missing: restore it with "
                                    "`dvc pull data/checkpoints.dvc`")
        logger.info("champion %s (%d edits) from %s", champ.version, champ.get("edits_so_far", 0), ckpt)
    else:
        logger.info("no champion yet: starting from the base model %s", base.name)
    promo = ledger.promotion(champ.version) if champ is not None else None
    session = open_session(base.model, base.tok, base.name, params.edit.method, s, cov, base.base_hash, anchor, ckpt,
                           promo.files if promo is not None else None)
    if champ is not None and weights_hash(base.model) != champ["weights_hash"]:
        raise RuntimeError(f"champion {champ.version} rebuilt to weights {weights_hash(base.model)[:12]}, but the "
                           f"ledger recorded {champ['weights_hash'][:12]}: the checkpoint folder was altered")
    return Champion(session, base_ref, base.base_hash, base.name, night_inputs(cov, anchor))


@task(cache_policy=NO_CACHE)
def validate(snap: BatchSnapshot, tok, facts: list[LedgerFact], params: Params, report_dir: Path) -> BatchValidation:
    """The batch's checks (GX suite, tokenizer, ledger) and its HTML/JSON report. The GX child
    is stopped after it, so its memory is returned before the edit."""
    try:
        result = check_batch(snap, tok, facts, params)
    finally:
        shared_suite().close()
    write_report(result, report_dir)
    return result


@task(cache_policy=NO_CACHE)
def edit(session: EditSession, requests: list[EditRequest], batch_size: int) -> list[dict[str, Any]]:
    """Apply the batch in sequential sub-batches; returns the per-request diagnostics."""
    diagnostics = apply_in_batches(session, requests, batch_size, get_run_logger())
    return_freed_memory()  # the v* step's bf16 copies and autograd buffers, before the evaluation
    return diagnostics


@task(name="answers-before", cache_policy=NO_CACHE)
def answers(session: EditSession, requests: list[EditRequest], params: Params) -> tuple[str, ...]:
    """The model's greedy answer to each fact's prompt (``tracking.answer_tokens`` tokens), for the
    reviewer's table: called before the edit and again after it."""
    if not params.tracking.answer_tokens:
        return ()
    prompts = [r.filled_prompt for r in requests]
    return tuple(greedy_generations(session.model, session.tok, prompts, params.tracking.answer_tokens))


@task(cache_policy=NO_CACHE)
def evaluate(session: EditSession, new: list[EditRequest], retained: list[EditRequest], base_ref: dict[str, Any],
             params: Params, before: tuple[str, ...] = ()) -> Candidate:
    """The edited model's metrics: the new batch alone, and retention
    (:func:`flows.ledger.lineage.retention_set`) + health over everything."""
    cfg = params.model_config()
    ratios = norm_ratios(frobenius_norms(session.model, list(session.base)), session.original_norms)
    scored, facts = edit_metrics_and_facts(session.model, session.tok, new, cfg.eval.batch_size,
                                           cfg.eval.batch_tokens)
    batch = scored.as_dict()
    return_freed_memory()
    scorer = scorer_for(params.scoring, ident_for(cfg.model, params, session.base_hash), list(session.base))
    retention, result = evaluation.evaluate(session.model, session.tok, retained, cfg.eval, base_ref, params.roots,
                                            ratios, session.state.edit_count, cfg.collapse, scorer=scorer)
    after = answers.fn(session, new, params)
    return Candidate(batch, retention, result.checks, ratios, tuple(new), before, after, tuple(facts))


@task(name="gate", cache_policy=NO_CACHE)
def judge(nb: NightBatch, candidate: Candidate, diagnostics: list[dict[str, Any]], edits: int, ledger: Ledger,
          champion: str | None, params: Params, tracker: AnyTracker) -> GateResult:
    """The gate's verdict, its metrics and the norm forecast, logged to MLflow and metrics.json."""
    logger = get_run_logger()
    skipped_fraction = sum(d["skipped"] for d in diagnostics) / len(diagnostics) if diagnostics else 0.0
    checks = gate(candidate.batch, candidate.retention, candidate.collapse_checks, skipped_fraction, params)
    flat = flat_metrics(candidate.batch, candidate.retention, diagnostics)
    tracker.log_metrics(nb.run_id, flat, step=edits)
    tracker.log_metrics(nb.run_id, {f"norm_ratio.{n}": r for n, r in candidate.norm_ratios.items()}, step=edits)
    history = norm_history(ledger, champion, candidate.norm_ratios, edits)
    tracker.log_norm_plot(nb.run_id, history, nb.report_dir / "norms.png", f"{nb.batch_id}: edited weight norms",
                          "||W_t||_F / ||W_0||_F")
    outlook = lineage_forecast(ledger, champion, params.model_config().collapse.max_norm_ratio,
                               candidate.norm_ratios, edits)
    tracker.log_metrics(nb.run_id, {f"forecast.{k}": v for k, v in outlook.items() if v is not None}, step=edits)
    _warn_forecast(nb, outlook, params, tracker)
    evaluation.write_metrics(nb.report_dir / "metrics.json", {**flat}, verdict_of(checks), {
        "batch_id": nb.batch_id, "batch_sha256": nb.snap.sha256, "edits_so_far": edits})
    tracker.log_artifact(nb.run_id, nb.report_dir / "metrics.json")
    failed = [c for c in checks if not c.passed]
    c = candidate
    tracker.log_table(nb.run_id, review.fact_table(c.requests, c.answers_before, c.answers_after, c.facts,
                                                   [d["case_id"] for d in diagnostics if d["skipped"]],
                                                   [f.name for f in failed]), review.FACTS_TABLE)
    logger.info("%s gate: %s", nb.batch_id, "pass" if not failed else "fail: " + "; ".join(c.message for c in failed))
    record = {"batch_id": nb.batch_id, "file_sha256": nb.snap.sha256,
              "request_ids": [d["case_id"] for d in diagnostics if not d["skipped"]],
              "skipped_ids": [d["case_id"] for d in diagnostics if d["skipped"]],
              "metrics": flat, "checks": [dataclasses.asdict(c) for c in checks], "mlflow_run_id": nb.run_id,
              "edits_so_far": edits, "norm_ratios": candidate.norm_ratios, "forecast": outlook}
    return GateResult(checks, flat, outlook, record)


def _warn_forecast(nb: NightBatch, outlook: dict[str, float | None], params: Params, tracker: AnyTracker) -> None:
    nights = outlook["nights_left"]
    if nights is not None and nights < params.promotion.forecast_warn_nights:
        get_run_logger().warning(
            "%s: at the current rate the worst norm ratio reaches the bound in %.0f nights (%.0f edits; "
            "promotion.forecast_warn_nights %g)", nb.batch_id, nights, outlook["edits_left"],
            params.promotion.forecast_warn_nights)
        tracker.tag_run(nb.run_id, {"forecast_warning": f"{nights:.0f} nights left"})


@task(name="quarantine", cache_policy=NO_CACHE)
def quarantine_invalid(nb: NightBatch, validation: BatchValidation, ledger: Ledger, params: Params,
                       tracker: AnyTracker) -> BatchOutcome:
    """A batch that failed validation: stored untouched in quarantine with its report; nothing edited."""
    get_run_logger().warning("%r failed validation: %s", nb.snap.name, validation.summary())
    problems = validation.problems_by_rule()
    folder = quarantine(nb.snap, validation, params.roots.quarantine, {"stage": "validation", "problems": problems})
    warn_if_rewritten(nb.snap)
    ledger.append("quarantine", batch_id=nb.batch_id, file_sha256=nb.snap.sha256, stage="validation",
                  problems=problems, quarantine=str(folder), mlflow_run_id=nb.run_id)
    _close_rejected(tracker, nb.run_id, [f"validation:{r}" for r in problems], verdict="quarantined")
    tracker.describe_run(nb.run_id, review.quarantined_sentence(nb.batch_id, problems_line(problems)))
    return BatchOutcome(nb.batch_id, "quarantined", stage="validation", folder=str(folder))


@task(name="reject", cache_policy=NO_CACHE)
def reject(nb: NightBatch, validation: BatchValidation, result: GateResult, session: EditSession,
           saved: SessionSnapshot, ledger: Ledger, params: Params, tracker: AnyTracker) -> BatchOutcome:
    """A batch the gate refused: the champion's weights restored in memory, the batch quarantined."""
    session.restore(saved)
    failed = result.failed
    folder = quarantine(nb.snap, validation, params.roots.quarantine,
                        {"stage": "gate", "failed_checks": [c.message for c in failed]})
    warn_if_rewritten(nb.snap)
    names = tuple(c.name for c in failed)
    ledger.append("reject", **result.record, failed_checks=list(names), quarantine=str(folder))
    _close_rejected(tracker, nb.run_id, list(names))
    tracker.describe_run(nb.run_id, review.rejected_sentence(nb.batch_id, champion_of(ledger)[0], names))
    return BatchOutcome(nb.batch_id, "rejected", failed_checks=names, folder=str(folder))


@task(cache_policy=NO_CACHE)
def promote(nb: NightBatch, result: GateResult, champion: Champion, parent: str | None, ledger: Ledger,
            params: Params, tracker: AnyTracker) -> BatchOutcome:
    """Write checkpoint ``vNNNN``, register it in MLflow, append the ledger, store the batch, move the alias."""
    logger, roots, session = get_run_logger(), params.roots, champion.session
    version = next_version(roots.checkpoints)
    ckpt = write_checkpoint(session, roots.checkpoints / version,
                            {"version": version, "batch_id": nb.batch_id, "batch_sha256": nb.snap.sha256},
                            params.checkpoints.snapshot_every)
    manifest = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))
    model_name = registered_model_name(champion.name)
    mv = _register(tracker, model_name, nb, ckpt, version, manifest["weights_hash"])
    # Ledger first, then the store: a crash in between leaves the batch in the inbox, and the next
    # night recognises it by its hash and finishes the store (a move first would lose it).
    accepted = free_target(nb.snap.path, roots.accepted)
    ledger.append("promote", **result.record, version=version, parent=parent,
                  weights_hash=manifest["weights_hash"], checkpoint=roots.relative(ckpt),
                  accepted_path=roots.relative(accepted), model_version=mv, edit_batch_size=params.edit.batch_size,
                  machine=machine_info(session.model), files=file_hashes(ckpt), compute_dtype=session.compute_dtype,
                  attention=session.attention, tail_group_slack=session.tail_group_slack,
                  inputs=champion.inputs, fingerprints=fingerprints(session.cumulative))
    store(nb.snap, accepted)  # the edited bytes, checked against the ledger's file_sha256
    release_stored(nb.snap)
    tracker.set_champion(model_name, mv)
    tracker.tag_run(nb.run_id, {"verdict": "promoted", "version": version})
    tracker.describe_run(nb.run_id, review.promoted_sentence(nb.batch_id, version, result.metrics,
                                                             max(result.record["norm_ratios"].values())))
    tracker.finish_run(nb.run_id)
    logger.info("%s promoted: champion is now %s (MLflow %s v%s), %d edits in all", nb.batch_id, version, model_name,
                mv, session.state.edit_count)
    return BatchOutcome(nb.batch_id, "promoted", version=version, weights_hash=manifest["weights_hash"])


def _close_rejected(tracker: AnyTracker, run_id: str, reasons: list[str], verdict: str = "rejected") -> None:
    """Tag the run with what failed and its verdict (``rejected`` by the gate, ``quarantined`` at
    validation), then close it."""
    tracker.mark_rejected(run_id, reasons)
    if verdict != "rejected":
        tracker.tag_run(run_id, {"verdict": verdict})
    tracker.finish_run(run_id)


def _register(tracker: AnyTracker, model_name: str, nb: NightBatch, ckpt: Path, version: str, whash: str) -> str:
    """The checkpoint in MLflow's registry: its edits (increment, deltas when a snapshot, manifest);
    the editor state stays on disk."""
    with tempfile.TemporaryDirectory() as staging:
        for f in registry_files(ckpt):
            shutil.copy2(ckpt / f, Path(staging) / f)
        return tracker.register_checkpoint(model_name, nb.run_id, Path(staging), version,
                                           {"batch_id": nb.batch_id, "weights_hash": whash})


def release_stored(snap: BatchSnapshot) -> None:
    """Clear the inbox entry whose bytes were stored (kept, with a warning, when rewritten meanwhile)."""
    kept = release(snap)
    if kept:
        get_run_logger().warning("%s", kept)


def warn_if_rewritten(snap: BatchSnapshot) -> None:
    if os.path.lexists(snap.path):
        get_run_logger().warning("%s was rewritten while the night ran: the quarantine holds the bytes the night "
                                 "read, the new content stays in the inbox as a new batch", snap.name)
