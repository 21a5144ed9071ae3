"""What the ``nas`` commands share: the two consoles, the common options, and the helpers that
read the project's config and load a model with its cached statistics and anchor, with progress bars.

``out`` is stdout (results, tables, JSON); ``console`` is stderr (progress, warnings, refusals).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from flows.config.model import ConfigError, ModelConfig, config_for
from flows.engine import editing
from flows.engine.caches import ensure_anchor, ensure_stats
from flows.paths import Roots

console = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="known name, hf:ORG/NAME, or a folder")]
ConfigOpt = Annotated[str | None, typer.Option(help="model config name or YAML (default: the model's)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: params.yaml "
                                              "runtime.device, auto: cuda where a GPU is present)")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="weights dtype: auto, float32, bfloat16 or float16 "
                                             "(default: params.yaml runtime.dtype, auto: bfloat16 on cuda)")]
ComputeOpt = Annotated[str | None, typer.Option("--compute-dtype", help="v* compute path: auto, float32 or "
                                                "bfloat16 (default: the model config's)")]

#: The help of a study's runner options (``nas bench horizon``, ``nas bench layer-sweep``).
RUNNER_HELP = {
    "runner": "sequential, or dask: the study's units (methods, layers) as Prefect tasks on a DaskTaskRunner",
    "address": "an existing Dask scheduler (tcp://HOST:8786); needs --runner dask [default: a local cluster]",
    "workers": "processes of the local Dask cluster; needs --runner dask [default: one per core]",
    "threads": "torch threads per unit; the same value gives the same bits on every runner [default: the process's]",
}
RunnerOpt = Annotated[str, typer.Option("--runner", help=RUNNER_HELP["runner"])]
AddressOpt = Annotated[str | None, typer.Option("--address", help=RUNNER_HELP["address"])]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help=RUNNER_HELP["workers"])]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help=RUNNER_HELP["threads"])]


def runner_settings(runner: str, address: str | None, workers: int | None, threads: int | None):
    """The ``--runner/--address/--workers/--threads`` options as RunnerSettings; a bad mix is a usage error."""
    from flows.config.runner import RunnerSettings

    try:
        return RunnerSettings(runner, address, workers, threads)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


@contextlib.contextmanager
def prefect_night() -> Iterator[None]:
    """The Prefect side of a flow-running command: stop the temporary Prefect servers of killed
    nights, record this process as a night with its token in the environment, and start this
    run's temporary server (when no PREFECT_API_URL is set), stopped when the block ends
    (:mod:`flows.refresh.prefect_runtime`)."""
    from flows.refresh import prefect_runtime

    claim = prefect_runtime.claim_night()
    if claim is not None:
        os.environ[prefect_runtime.TOKEN_ENV] = claim.token
    with prefect_runtime.temporary_server():
        yield


def use_runtime(device: str | None, dtype: str | None) -> tuple[str, str]:
    """Put ``--device``/``--dtype`` in the environment for this command (params.yaml's ``runtime``
    reads them, so a flow run by the command gets them too) and return the resolved pair."""
    from flows.config.params import ENV_DEVICE, ENV_DTYPE, RuntimeParams, load_params
    from flows.engine.precision import runtime

    try:
        RuntimeParams(device or "auto", dtype or "auto")  # a bad value is a usage error here, not in a flow
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    for name, value in ((ENV_DEVICE, device), (ENV_DTYPE, dtype)):
        if value:
            os.environ[name] = value
    try:
        chosen = load_params().runtime
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None
    return runtime(chosen.device, chosen.dtype)


class LineProgress(Progress):
    """rich's bar on a terminal; on anything else (a nohup log, a CI log) one line per tenth of each
    task's total (and the first unit, which gives the rate), so a 20-minute anchor calibration
    shows itself in a log file too."""

    def __init__(self, *columns, steps: int = 10, **kwargs):
        super().__init__(*columns, **kwargs)
        self._steps = steps
        self._shown: dict[TaskID, int] = {}

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def _line(self, task_id: TaskID) -> None:
        if self.console.is_terminal:
            return
        task = next(t for t in self.tasks if t.id == task_id)
        if not task.total:
            return
        step = int(task.completed * self._steps // task.total)
        if step <= self._shown.get(task_id, -1):
            return
        self._shown[task_id] = step
        rate = task.fields.get("rate", "")
        self.console.print(f"{task.description}: {task.completed:,.0f}/{task.total:,.0f} after "
                           f"{task.elapsed or 0.0:.0f} s{f' ({rate})' if rate else ''}", highlight=False)


def progress_bar() -> Progress:
    """A progress bar on stderr with a free-text ``rate`` field (tok/s, s/edit); lines in a log
    (:class:`LineProgress`)."""
    return LineProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console)


def roots() -> Roots:
    """The project's folders (params.yaml ``paths``; defaults without a params.yaml)."""
    from flows.config.params import load_params

    try:
        return load_params().roots
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="params.yaml") from None


def model_config(model: str, config: str | None) -> ModelConfig:
    """The ``--config`` (default: the model's own) as a ModelConfig; a bad one is a usage error."""
    try:
        return config_for(config or model, roots().configs)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None


def method_settings(cfg: ModelConfig, method: str, nas: bool | None, pilots: int | None = None):
    """The method's settings, NAS switched by ``nas`` and the pilot count overridden by ``pilots``."""
    try:
        s = cfg.method(method, nas)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--method") from None
    if pilots:
        s = dataclasses.replace(s, nas=dataclasses.replace(s.nas, pilots=pilots))
    return s


def fetch_and_load(model: str, fetch: bool = True):
    """Fetch (no-op when present) and load a model on the command's device and dtype
    (:func:`use_runtime`); returns (model, tok, name, base hash)."""
    from flows.assets.fetch import fetch_model
    from flows.assets.load import load_model
    from nas_core.deltas import weights_hash

    result = fetch_model(model, roots().models) if fetch else None
    path = result.path if result is not None else Path(model)
    device, dtype = use_runtime(None, None)
    t0 = time.perf_counter()
    m, tok = load_model(path, dtype=dtype, device=device)
    logging.getLogger(__name__).info("loaded %s on %s in %s in %.2f s", path, device, dtype, time.perf_counter() - t0)
    return m, tok, path.name, weights_hash(m)


def covariance_stats(m, tok, name, cfg: ModelConfig, base_hash: str, layers,
                     force: bool = False) -> dict[int, torch.Tensor]:
    """The cached covariance statistics C of ``layers`` (measured now, with a progress bar, if absent)."""
    with progress_bar() as bar:
        task = bar.add_task("covariance", total=cfg.stats.tokens, rate="")
        t0 = time.perf_counter()

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total,
                       rate=f"{done / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

        cov, path, cached = ensure_stats(m, tok, name, layers, cfg.stats, base_hash, roots(), progress=tick,
                                                 force=force)
    console.print(f"statistics {'(cached) ' if cached else ''}{path}")
    return cov


def reference_norm(m, tok, name, method, settings, base_hash, source: str, runner=None) -> float | None:
    """The cached NAS reference norm a (calibrated now if absent); None when NAS is off.

    The pilots run on ``runner`` (None: params.yaml ``anchor.runner``); a dask runner's workers load
    ``source`` (the command's ``--model``) themselves."""
    from flows.config.params import load_params
    from flows.engine.workers import BaseIdent

    if not settings.nas.enabled:
        return None
    if runner is None:
        runner = load_params().anchor.runner
    device, dtype = use_runtime(None, None)
    ident = BaseIdent(source, roots().models, device, dtype, base_hash)
    with progress_bar() as bar:
        task = bar.add_task("NAS pilots", total=settings.nas.pilots, rate="")
        rec, path, cached = ensure_anchor(
            m, tok, name, method, settings, base_hash, roots(),
            progress=lambda d, t: bar.update(task, completed=d, total=t, rate=""), runner=runner, ident=ident)
    console.print(f"NAS reference norm a = {rec['reference_norm']:.3f} "
                  f"({rec['pilots']} pilots, {rec['dropped']} dropped){' (cached)' if cached else ''}: {path}")
    return float(rec["reference_norm"])


def base_session(model, method, nas, config=None, pilots=None, settings_fn=None):
    """An edit session on the base model with its cached statistics and anchor (``settings_fn`` adjusts the method)."""
    cfg = model_config(model, config)
    s = method_settings(cfg, method, nas, pilots)
    if settings_fn is not None:
        s = settings_fn(s)
    m, tok, name, h = fetch_and_load(model)
    cov = covariance_stats(m, tok, name, cfg, h, cfg.all_layers())
    a = reference_norm(m, tok, name, method, s, h, model)
    return editing.open_session(m, tok, name, method, s, cov, h, a)
