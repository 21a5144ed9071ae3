"""``nas bench layer-sweep`` as a Prefect flow: r-ROME (NAS off) at each layer alone, one task per
layer on the flow's task runner (:mod:`flows.studies.runner`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config.model import ModelConfig
from flows.config.runner import RunnerSettings
from flows.engine.caches import ensure_stats
from flows.engine.workers import BaseIdent, driver_base, unit_base, unit_threads
from flows.paths import Roots
from flows.studies import stopping
from flows.studies.bench import SweepRow, counterfact_cases, sweep_layers, sweep_one
from flows.studies.runner import task_runner
from nas_core.requests import EditRequest


@task(cache_policy=NO_CACHE)
def sweep_layer(layer: int, ident: BaseIdent, cfg: ModelConfig, cov_layers: list[int], reqs: list[EditRequest],
                roots: Roots, threads: int | None = None) -> SweepRow:
    """One layer of the sweep on this process's base model, with ``threads`` torch threads."""
    logger = get_run_logger()
    with unit_threads(threads) as used:
        base = unit_base(ident, logger)
        cov, _, _ = ensure_stats(base.model, base.tok, base.name, cov_layers, cfg.stats, ident.base_hash, roots)
        row = sweep_one(base.model, base.tok, base.name, cfg, ident.base_hash, cov, layer, reqs)
    logger.info("layer %d: efficacy %d/%d, paraphrase %d/%d", layer, row.efficacy, len(reqs), row.paraphrase,
                len(reqs))
    return dataclasses.replace(row, record={**row.record, "threads": used})


@flow(name="layer-sweep", log_prints=False, task_runner=task_runner(RunnerSettings()))
def layer_sweep_study(model_name: str, layers: Sequence[int], cases: int, runner: RunnerSettings = RunnerSettings(),
                      project: Path | None = None) -> list[SweepRow]:
    """Every layer of ``layers`` on the first ``cases`` CounterFact cases, in layer order."""
    from flows.config.model import config_for
    from flows.config.params import load_params

    params = load_params(project=project)
    cfg = config_for(model_name, params.roots.configs)
    ident, base = driver_base(cfg.model, params)
    cov_layers = sweep_layers(layers, cfg)
    _, path, cached = ensure_stats(base.model, base.tok, base.name, cov_layers, cfg.stats, base.base_hash,
                                   params.roots)  # measured here once, before the units read it
    get_run_logger().info("statistics %s%s; %s runner", path, " (cached)" if cached else "", runner.kind)
    reqs = counterfact_cases(params.roots, cases)
    units = [sweep_layer.submit(layer, ident, cfg, cov_layers, reqs, params.roots, runner.threads)
             for layer in layers]
    return [stopping.result_of(u) for u in units]  # a SIGTERM or Ctrl-C ends the sweep at once
