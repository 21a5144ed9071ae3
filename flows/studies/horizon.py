"""The editing-horizon study: how long a stream of edits lasts, with and without NAS.

``nas bench horizon`` runs this Prefect flow. Every method (memit, alphaedit, rome, each
with and without Norm-Anchor Scaling) edits the *same* stream of CounterFact requests
from the *same* base model, in sequential batches. Every ``eval_every`` edits it measures
retention (edit metrics over every request sent so far), canary perplexity, general
tasks and weight-norm ratios, and asks the collapse verdict. Results go to
``results.json``, ``horizon.png`` and MLflow (one run per method, step = edits so far).

Resumable: each method's latest checkpoint carries the points measured so far in its
manifest (one atomic write), so an interrupted study continues from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config.model import ModelConfig
from flows.config.runner import RunnerSettings
from flows.engine import editing, evaluation, precision
from flows.engine.base import BaseModel
from flows.engine.caches import ensure_anchor, ensure_stats
from flows.engine.checkpoints import write_checkpoint
from flows.engine.loading import logged_progress
from flows.engine.shards import ShardedScorer
from flows.engine.workers import BaseIdent, driver_base, unit_base, unit_threads
from flows.io import atomic_write_text, digest, loaded_code_version, now
from flows.paths import Roots
from flows.studies import stopping
from flows.studies.horizon_points import amortised_line, collapse_point, past_collapse, plot, verdict_point
from flows.studies.runner import task_runner
from nas_core.collapse import norm_ratios
from nas_core.deltas import edited_weights, frobenius_norms, materialise
from nas_core.editors import METHODS as METHODS_BASE
from nas_core.editors import VARIANTS
from nas_core.evaluate.counterfact import Scorer, score_here
from nas_core.formats import from_counterfact_easyedit
from nas_core.requests import EditRequest
from nas_core.spec import spec_for

#: Every editor with and without NAS, in registry order.
METHODS = tuple(f"{m}{nas}" for m in METHODS_BASE for nas in ("", "+nas"))


@dataclass(frozen=True)
class HorizonSettings:
    """The study's shape (params.yaml ``horizon`` or ``nas bench horizon`` options).

    Attributes:
        methods: method names, each optionally suffixed ``+nas``.
        stream_length: requests in the stream (the first N of the source, in order).
        batch_size: requests per sequential edit call.
        eval_every: edits between two measurements (rounded up to whole batches).
        general_items: items per general task at each measurement (the base model's
            reference uses the same number).
        canary_tokens: canary tokens scored for perplexity at each measurement.
        pilots: NAS pilots for the anchors (1000 in the paper; fewer keeps a CPU study short).
        eval_every_dense: edits between two measurements until ``dense_until`` edits (then
            ``eval_every``); 0 keeps ``eval_every`` throughout.
        dense_until: where the dense measurements stop.
        retention_sample: retention is scored on a fixed seeded sample of this many of the
            edits before the last batch, plus every edit of the last batch, so a point costs
            the same at edit 100 and at edit 3,000 (all earlier edits while fewer).
        retention_seed: the sample's seed; the sample of every point is recorded with it.
        compute_dtype: the v* compute path (``auto``, ``float32``, ``bfloat16``); None keeps
            the model config's.
        stop_after_collapse: a method stops after this many measurements past its CP@60
            (``collapse_point``), before ``stream_length``.

    The defaults fit the 60-minute budget of a 2-core CPU with SmolLM2-135M: a measurement
    costs about 2 forward TFLOP (canary + general tasks + retention), about as much as 5
    edits, so 4 measurements per method and 1024 canary tokens / 10 items per task.
    """

    methods: tuple[str, ...] = METHODS
    stream_length: int = 40
    batch_size: int = 5
    eval_every: int = 10
    general_items: int = 10
    canary_tokens: int = 1024
    pilots: int = 50
    eval_every_dense: int = 0
    dense_until: int = 0
    retention_sample: int = 200
    retention_seed: int = 0
    compute_dtype: str | None = None
    stop_after_collapse: int = 1

    def __post_init__(self) -> None:
        if self.stop_after_collapse < 0:
            raise ValueError("horizon: stop_after_collapse must be >= 0")
        if min(self.eval_every_dense, self.dense_until, self.retention_sample) < 0:
            raise ValueError("horizon: eval_every_dense, dense_until and retention_sample must be >= 0")
        if self.compute_dtype not in (None, "auto", "float32", "bfloat16"):
            raise ValueError(f"horizon.compute_dtype must be auto, float32 or bfloat16, got {self.compute_dtype!r}")
        known = (*METHODS_BASE, *VARIANTS)
        bad = [m for m in self.methods if m.removesuffix("+nas") not in known]
        if bad or not self.methods:
            raise ValueError(f"horizon.methods: unknown {bad}; use one of {', '.join(known)} with optional +nas")
        if min(self.stream_length, self.batch_size, self.eval_every, self.pilots) < 1 or self.general_items < 0:
            raise ValueError("horizon: stream_length, batch_size, eval_every and pilots must be >= 1")
        if self.canary_tokens < 2:
            raise ValueError("horizon: canary_tokens must be >= 2")


def stream_requests(source: Path, n: int) -> list[EditRequest]:
    """The first ``n`` requests of a CounterFact file (EasyEdit layout), in file order."""
    if not source.is_file():
        raise FileNotFoundError(f"horizon stream {source} is absent (../shared/data/counterfact)")
    report = from_counterfact_easyedit(json.loads(source.read_text(encoding="utf-8")))
    return list(report.requests[:n])


def study_dir(root: Path, model_name: str, settings: HorizonSettings, source: Path,
              config: ModelConfig | None = None) -> Path:
    """A folder per distinct study (same settings, model config and stream -> same folder -> resumable).

    The method list and the stopping rule are not part of the key: a method added later joins
    the same study, and the methods already measured are resumed, not redone. A changed model
    config (its v* path, layers, NAS) is another study, never a resume of stale points.
    """
    shape = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("methods", "stop_after_collapse")}
    ident = {"model": model_name, "settings": shape, "source": source.name}
    if config is not None:
        ident["config"] = dataclasses.asdict(config)
    key = digest(ident)
    return root / f"{model_name}-{key}"


def _other_methods(out: Path) -> dict[str, Any]:
    """Every method the study folder holds points of (``*/points.json``), as results entries:
    methods run by another process or an earlier invocation are kept in ``results.json``."""
    found = {}
    for f in sorted(out.glob("*/points.json")):
        doc = json.loads(f.read_text(encoding="utf-8"))
        pts = doc["points"]
        found[doc["method"]] = {"points": pts, "collapse_point": collapse_point(pts),
                                "verdict_point": verdict_point(pts), "final": pts[-1] if pts else {"metrics": {}}}
    return found


def next_measurement(done: int, settings: HorizonSettings) -> int:
    """The edit count of the first measurement after ``done`` edits."""
    if settings.eval_every_dense and done < settings.dense_until:
        return min((done // settings.eval_every_dense + 1) * settings.eval_every_dense, settings.dense_until)
    return (done // settings.eval_every + 1) * settings.eval_every


def retention_sample(done: int, last_batch: int, size: int, seed: int) -> list[int]:
    """Stream indices a measurement after ``done`` edits scores retention on.

    Every edit of the last batch, plus ``size`` of the earlier ones chosen by a seeded
    priority per stream index (the ``size`` lowest priorities): the priority of an edit never
    changes, so successive samples share most of their members and the curve is smooth. All
    earlier edits while there are at most ``size`` of them.
    """
    earlier = done - last_batch
    if earlier <= size:
        chosen = list(range(earlier))
    else:
        rng = random.Random(seed)
        priority = [rng.random() for _ in range(earlier)]
        chosen = sorted(sorted(range(earlier), key=priority.__getitem__)[:size])
    return chosen + list(range(earlier, done))


@task(cache_policy=NO_CACHE)
def run_method(label: str, ident: BaseIdent, cfg: ModelConfig, settings: HorizonSettings, stream: list[EditRequest],
               base_ref: dict[str, Any], roots: Roots, out: Path, runner: RunnerSettings = RunnerSettings(),
               retention_shards: int = 1, stop: Path | None = None,
               anchor_runner: RunnerSettings = RunnerSettings()) -> list[dict[str, Any]]:
    """Edit ``stream`` with one method from the base model (loaded by this process, :func:`unit_base`)
    with ``runner.threads`` torch threads, each point's retention scored in ``retention_shards``
    shards on ``runner`` (on a Dask worker: the same cluster), a +nas method's first anchor
    calibrated on ``anchor_runner`` (params.yaml ``anchor.runner``); returns its measured points,
    early when the run's ``stop`` flag is raised (:mod:`flows.studies.stopping`). The method's
    folder is locked while it edits."""
    logger = get_run_logger()
    loaded_code_version()  # this process's code, before anything can commit beside it
    with stopping.method_lock(out / label), unit_threads(runner.threads):
        base = unit_base(ident, logger)
        model, tok = base.model, base.tok
        cov, _, _ = ensure_stats(model, tok, base.name, cfg.all_layers(), cfg.stats, ident.base_hash, roots)
        names = [spec_for(model).weight_name(layer) for layer in cfg.all_layers()]
        base_weights = edited_weights(model, names)
        scorer = ShardedScorer(retention_shards, runner, ident, tuple(names)) if retention_shards > 1 else score_here
        try:
            return _edit_stream(label, base, cfg, settings, stream, cov, base_ref, roots, out, logger, scorer, stop,
                                (anchor_runner, ident))
        finally:
            materialise(model, base_weights, {})  # the process's model is the base again for its next unit


def _edit_stream(label: str, base: BaseModel, cfg: ModelConfig, settings: HorizonSettings, stream: list[EditRequest],
                 cov: dict, base_ref: dict[str, Any], roots: Roots, out: Path, logger,
                 scorer: Scorer = score_here, stop: Path | None = None,
                 pilots: tuple[RunnerSettings, BaseIdent | None] = (RunnerSettings(), None)) -> list[dict[str, Any]]:
    """The method's stream from its last checkpoint (or the base model) to the end, past collapse,
    or until the run's ``stop`` flag is raised (checked before every batch). ``pilots``: where a
    first anchor's pilots run, and the base they run on there."""
    session, points = _method_session(label, base.model, base.tok, base.name, cfg, settings, cov, base.base_hash,
                                      roots, out / label / "checkpoint", logger, pilots)
    done = points[-1]["edits"] if points else 0
    if points:
        logger.info("%s: resuming after %d edits (%d points)", label, done, len(points))
    clock = StreamClock.resumed(points)
    next_eval = next_measurement(done, settings)
    log_mark = len(session.request_log)
    while done < len(stream) and not past_collapse(points, settings):
        if stopping.flag_raised(stop):
            logger.warning("%s: stopped on request after %d edits; its checkpoint holds %d", label, done,
                           points[-1]["edits"] if points else 0)
            break
        batch = stream[done : done + settings.batch_size]
        clock.edited(session, batch)
        done += len(batch)
        if done < next_eval and done < len(stream):
            continue
        next_eval = next_measurement(done, settings)
        point = _measure(session, stream, done, len(batch), cfg, settings, base_ref, roots, clock, log_mark, scorer)
        points.append(point)
        log_mark = len(session.request_log)
        _save_points(session, label, out, points)
        m = point["metrics"]
        logger.info("%s: %d edits, score %s, ppl x%.2f, norm x%.3f, %.2f s/edit (%.2f with measurements)%s",
                    label, done, _fmt(m.get("editing_score")), m.get("perplexity_ratio", float("nan")),
                    m.get("norm_ratio_max", float("nan")), point["seconds_per_edit"], point["seconds_per_edit_all"],
                    f", COLLAPSE ({', '.join(point['failed_checks'])})" if point["collapsed"] else "")
    return points


@dataclass
class StreamClock:
    """Where a method's time went: editing (with the editor's phases) and measuring."""

    edit_seconds: float = 0.0
    measure_seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    @classmethod
    def resumed(cls, points: list[dict[str, Any]]) -> StreamClock:
        last = points[-1] if points else {}
        return cls(last.get("edit_seconds", 0.0), sum(p["eval_seconds"] for p in points),
                   dict(last.get("phase_seconds", {})))

    def edited(self, session: editing.EditSession, batch: list[EditRequest]) -> None:
        t0 = time.perf_counter()
        result = session.apply(batch)
        self.edit_seconds += time.perf_counter() - t0
        for phase, sec in result.timings.items():
            self.phases[phase] = self.phases.get(phase, 0.0) + sec


def _measure(session: editing.EditSession, stream: list[EditRequest], done: int, last_batch: int, cfg: ModelConfig,
             settings: HorizonSettings, base_ref: dict[str, Any], roots: Roots, clock: StreamClock,
             log_mark: int, scorer: Scorer = score_here) -> dict[str, Any]:
    """One point after ``done`` edits: retention on a seeded sample, health, norms, and the time so far."""
    original = session.original_norms
    ratios = norm_ratios(frobenius_norms(session.model, list(original)), original)
    t1 = time.perf_counter()
    sample = retention_sample(done, last_batch, settings.retention_sample, settings.retention_seed)
    metrics, verdict = evaluation.evaluate(session.model, session.tok, [stream[i] for i in sample],
                                           cfg_eval(cfg, settings), base_ref, roots, ratios, done, cfg.collapse,
                                           with_fluency=False, scorer=scorer)
    eval_seconds = time.perf_counter() - t1
    clock.measure_seconds += eval_seconds
    return {"edits": done, "metrics": metrics, "collapsed": verdict.collapsed,
            "failed_checks": [c.name for c in verdict.failed],
            "skipped": sum(r["skipped"] for r in session.request_log),
            "edit_seconds": round(clock.edit_seconds, 2), "seconds_per_edit": round(clock.edit_seconds / done, 3),
            "eval_seconds": round(eval_seconds, 2), "compute_dtype": session.compute_dtype,
            "attention": session.attention, "tail_group_slack": session.tail_group_slack,
            # Where the time went so far: the editor's phases (the rest of edit_seconds is
            # the session's bookkeeping) and the measurements, and the amortised cost of both.
            "phase_seconds": {k: round(v, 2) for k, v in clock.phases.items()},
            "seconds_per_edit_all": round((clock.edit_seconds + clock.measure_seconds) / done, 3),
            "retention_sample": {"seed": settings.retention_seed, "size": settings.retention_sample,
                                 "indices": sample}, "v_norm_before_mean": _v_norm_mean(session, log_mark),
            "threads": torch.get_num_threads(), "process": f"{socket.gethostname()}:{os.getpid()}",
            "machine": precision.cpu_facts()["cpu"],
            "code_version": loaded_code_version(), "measured_at": now()}


def _method_session(label: str, model, tok, model_name: str, cfg: ModelConfig, settings: HorizonSettings,
                    cov: dict, base_hash: str, roots: Roots,
                    ckpt_dir: Path, logger, pilots: tuple[RunnerSettings, BaseIdent | None] = (RunnerSettings(), None),
                    ) -> tuple[editing.EditSession, list[dict[str, Any]]]:
    """The method's session on the base model, or resumed from its checkpoint, and its points so far.

    A resumed method keeps the precision path its points were measured on. A +nas method's anchor is
    calibrated here the first time (minutes to tens of minutes): its pilots are logged every tenth."""
    method, nas = label.removesuffix("+nas"), label.endswith("+nas")
    s = cfg.method(method, nas)
    s = dataclasses.replace(s, nas=dataclasses.replace(s.nas, pilots=settings.pilots))
    if settings.compute_dtype is not None:
        s = precision.with_path(s, settings.compute_dtype)
    anchor = None
    if nas:
        rec, path, cached = ensure_anchor(model, tok, model_name, method, s, base_hash, roots,
                                          progress=logged_progress(logger, f"{label}: NAS anchor pilots"),
                                          runner=pilots[0], ident=pilots[1])
        anchor = float(rec["reference_norm"])
        logger.info("%s: NAS reference norm a = %.4f from %d pilots%s (%s)", label, anchor, rec["pilots"],
                    " (cached)" if cached else "", path)
    resume = ckpt_dir if (ckpt_dir / "manifest.json").is_file() else None
    man = json.loads((resume / "manifest.json").read_text(encoding="utf-8")) if resume is not None else None
    if man is not None:
        s = precision.with_path(s, *precision.recorded_path(man["settings"]["values"]))
    session = editing.open_session(model, tok, model_name, method, s, cov, base_hash, anchor, resume)
    session.keep_increment = False  # its checkpoint is rewritten in place: always a snapshot
    return session, list(man["horizon_points"]) if man is not None else []


def _save_points(session: editing.EditSession, label: str, out: Path, points: list[dict[str, Any]]) -> None:
    """The method's checkpoint with its points, and points.json (readable while the study runs:
    scripts/horizon_report.py gathers them)."""
    done = points[-1]["edits"]
    write_checkpoint(session, out / label / "checkpoint", {"horizon_points": points, "horizon_edits": done})
    atomic_write_text(out / label / "points.json", json.dumps(
        {"method": label, "points": points, "collapse_point": collapse_point(points),
         "verdict_point": verdict_point(points)}, indent=1, allow_nan=True))


def _v_norm_mean(session: editing.EditSession, since: int) -> float | None:
    """Mean ||v*|| before anchoring over the requests logged since index ``since`` (the edits
    since the previous measurement): the feedback loop NAS breaks shows as its growth."""
    values = [r["v_norm_before"] for r in session.request_log[since:]]
    return round(sum(values) / len(values), 3) if values else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def cfg_eval(cfg: ModelConfig, settings: HorizonSettings):
    return dataclasses.replace(cfg.eval, general_items=settings.general_items,
                               canary_tokens=settings.canary_tokens)


@flow(name="horizon-study", log_prints=False, task_runner=task_runner(RunnerSettings()))
def horizon_study(
    model_name: str = "smollm2-135m",
    settings: HorizonSettings = HorizonSettings(),
    source: Path | None = None,
    out_root: Path = Path("bench/horizon"),
    tracking_uri: str | None = None,
    project: Path | None = None,
    runner: RunnerSettings = RunnerSettings(),
    retention_shards: int = 1,
) -> dict[str, Any]:
    """Run every method over the same stream (default: CounterFact's edit split) of the project's
    shared data, each method a task on the flow's task runner (``runner``, applied by
    :func:`flows.studies.runner.run_study`), each point's retention in ``retention_shards`` shards
    on the same runner (the same numbers); write results.json, horizon.png and MLflow runs."""
    from flows.config.model import config_for
    from flows.config.params import load_params

    logger = get_run_logger()
    loaded_code_version()  # the code this process loaded, for every point it measures
    params = load_params(project=project)
    roots = params.roots
    source = Path(source) if source is not None else roots.horizon_stream
    cfg = config_for(model_name, roots.configs)
    ident, base = driver_base(cfg.model, params)
    stream = stream_requests(source, settings.stream_length)
    weights_dtype = str(next(base.model.parameters()).dtype).removeprefix("torch.")
    label = base.name if weights_dtype == "float32" else f"{base.name}-{weights_dtype}"
    out = study_dir(Path(out_root), label, settings, source, cfg)  # float32 keeps the keys studies had
    out.mkdir(parents=True, exist_ok=True)
    logger.info("horizon study in %s: %d requests from %s, methods %s, %s runner", out, len(stream), source.name,
                ", ".join(settings.methods), runner.kind)
    _, cov_path, cached = ensure_stats(base.model, base.tok, base.name, cfg.all_layers(), cfg.stats,
                                       base.base_hash, roots)  # measured here once, before the units read it
    logger.info("statistics %s%s", cov_path, " (cached)" if cached else "")
    base_ref = evaluation.base_reference(base.model, base.tok, base.name, base.base_hash, cfg_eval(cfg, settings),
                                         roots)
    results: dict[str, Any] = {"model": base.name, "base_weights_hash": base.base_hash, "source": str(source),
                               "settings": dataclasses.asdict(settings),
                               "runner": {**runner.record(), "retention_shards": retention_shards},
                               "collapse": dataclasses.asdict(cfg.collapse), "methods": {},
                               "base_point": {"editing_score": None, "perplexity_ratio": 1.0, "norm_ratio_max": 1.0,
                                              **base_ref["metrics"]}}
    if retention_shards < 1:
        raise ValueError(f"retention_shards must be >= 1, got {retention_shards}")
    stop = stopping.new_flag(out)
    units = {m: run_method.submit(m, ident, cfg, settings, stream, base_ref, roots, out, runner, retention_shards,
                                  stop, params.anchor.runner) for m in settings.methods}
    try:
        for label, unit in units.items():
            points = stopping.result_of(unit)
            results["methods"][label] = {"points": points, "collapse_point": collapse_point(points),
                                         "verdict_point": verdict_point(points),
                                         "final": points[-1] if points else {"metrics": {}}}
            results["methods"] = {**_other_methods(out), **results["methods"]}  # a second process's methods stay
            atomic_write_text(out / "results.json", json.dumps(results, indent=1, allow_nan=True))
    except BaseException as exc:  # SIGTERM (Prefect's TerminationSignal), Ctrl-C, a unit's failure
        stopping.stop_units(units, stop, f"horizon study interrupted ({type(exc).__name__})", logger)
        raise
    finally:
        stopping.drop_flag(stop)
    png = plot(results, out / "horizon.png")
    log_to_mlflow(results, out / "results.json", png, tracking_uri, roots.project)
    _log_summary(results, settings, len(stream))
    results["results_path"] = str(out / "results.json")
    results["plot_path"] = str(png)
    return results


def _log_summary(results: dict[str, Any], settings: HorizonSettings, n_stream: int) -> None:
    """Each method's collapse point, final scores and throughput verdict, in the run's log."""
    logger = get_run_logger()
    for label, res in results["methods"].items():
        cp = res["collapse_point"]
        m = res["final"]["metrics"]
        logger.info("%-14s collapse point: %-16s final score %s (ES %s / PS %s / NS %s), ppl x%.2f, norm x%.3f, "
                    "%.2f s/edit", label, f"{cp} edits" if cp else f"none within {n_stream}",
                    _fmt(m.get("editing_score")), _fmt(m.get("efficacy_success")),
                    _fmt(m.get("generalisation_success")), _fmt(m.get("specificity_success")),
                    m.get("perplexity_ratio", float("nan")), m.get("norm_ratio_max", float("nan")),
                    res["final"].get("seconds_per_edit", float("nan")))
        line = amortised_line(label, res["points"], settings)
        if line:
            logger.info("%s", line)


def log_to_mlflow(results: dict[str, Any], results_path: Path, png: Path, tracking_uri: str | None,
                  project: Path) -> None:
    """One MLflow run per method in experiment ``horizon-study``: metrics with step = edits so far."""
    from flows.tracking.tracker import Tracker
    from flows.tracking.uris import resolve_tracking_uri

    tracker = Tracker(resolve_tracking_uri(tracking_uri, project), experiment="horizon-study")
    for label, res in results["methods"].items():
        params = {"method": label, "model": results["model"], **results["settings"],
                  "base_weights_hash": results["base_weights_hash"]}
        run_id = tracker.start_batch_run(f"horizon-{label}", params, {"study": results_path.parent.name})
        for p in res["points"]:
            numeric = {k: float(v) for k, v in p["metrics"].items() if isinstance(v, int | float)}
            numeric["seconds_per_edit"] = p["seconds_per_edit"]
            tracker.log_metrics(run_id, numeric, step=p["edits"])
        cp = res["collapse_point"]
        tracker.tag_run(run_id, {"collapse_point": str(cp) if cp else "none"})
        tracker.log_artifact(run_id, results_path)
        tracker.log_artifact(run_id, png)
        tracker.finish_run(run_id)
