"""``nas bench horizon``, the editing-horizon study (a Prefect flow), and the stream timing of
``nas bench speed --stream``, which runs one method of the same flow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.common import (
    AddressOpt,
    ComputeOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    RunnerOpt,
    ThreadsOpt,
    WorkersOpt,
    out,
    prefect_night,
    runner_settings,
    use_runtime,
)

commands = typer.Typer()


def stream_speed(model: str, label: str, n: int, batch_size: int, pilots: int | None, compute_dtype) -> None:
    """``nas bench speed --stream``: one method of the horizon flow, its phases and the target."""
    from flows.engine import precision
    from flows.studies import stream_speed as study
    from flows.studies.horizon import horizon_study
    from flows.studies.horizon_points import amortised_line

    try:
        settings = study.stream_settings(label, n, batch_size, pilots, compute_dtype)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    with prefect_night():
        res = horizon_study(model, settings, None, study.OUT_ROOT, None)
    points = res["methods"][label]["points"]
    table = Table("edits", "s/edit editing", "with measurements", *study.PHASES, "measure",
                  title=f"{label} on {res['model']}: a stream of {n} at batch {batch_size} (cumulative seconds)")
    for r in study.stream_rows(points):
        table.add_row(str(r.edits), f"{r.seconds_per_edit:.2f}", f"{r.seconds_per_edit_all:.2f}",
                      *(f"{x:.0f}" for x in r.phase_seconds), f"{r.measured_seconds:.0f}")
    out.print(table)
    out.print(precision.describe_machine(), highlight=False)
    line = amortised_line(label, points, settings)
    if line:
        out.print(line, highlight=False)


@commands.command("horizon")
def bench_horizon(
    model: ModelOpt = "smollm2-135m",
    methods: Annotated[str | None, typer.Option(help="comma-separated method[+nas] list [default: all six]")] = None,
    stream_length: Annotated[int | None, typer.Option(help="CounterFact requests in the stream [default: 40]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="requests per sequential edit call [default: 5]")] = None,
    eval_every: Annotated[int | None, typer.Option(help="edits between measurements [default: 10]")] = None,
    general_items: Annotated[int | None, typer.Option(help="items per general task per measurement [default: 10]")]
    = None,
    canary_tokens: Annotated[int | None, typer.Option(help="canary tokens per measurement [default: 1024]")] = None,
    pilots: Annotated[int | None, typer.Option(help="NAS pilots for the anchors [default: 50]")] = None,
    eval_every_dense: Annotated[int | None, typer.Option(help="edits between measurements until --dense-until")]
    = None,
    dense_until: Annotated[int | None, typer.Option(help="where the dense measurements stop [default: 0]")] = None,
    retention_sample: Annotated[int | None, typer.Option(help="earlier edits scored per measurement, a fixed "
                                                         "seeded sample [default: 200]")] = None,
    compute_dtype: ComputeOpt = None,
    source: Annotated[Path | None, typer.Option(help="CounterFact JSON (EasyEdit layout)")] = None,
    out_root: Annotated[Path, typer.Option("--out", help="studies live in OUT/MODEL-KEY/")] = Path("bench/horizon"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite mlflow.db)")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    runner: RunnerOpt = "sequential",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    retention_shards: Annotated[int, typer.Option(min=1, help="each measurement's retention scored in this many "
                                                  "shards on the runner (the same numbers)")] = 1,
) -> None:
    """The editing-horizon study (a Prefect flow): every method on the same edit stream, until collapse.

    Resumable: run the same command again to continue; a method added to --methods joins the study.
    Example: nas bench horizon --methods memit,memit+nas --stream-length 3000 --batch-size 10
    --eval-every 250 --eval-every-dense 100 --dense-until 1000 --compute-dtype auto
    Example: nas bench horizon --methods memit,memit+nas --runner dask --workers 2 --threads 1
    Example: nas bench horizon --methods alphaedit+nas --runner dask --workers 4 --threads 1 --retention-shards 3
    """
    from flows.engine import precision
    from flows.studies.horizon import horizon_study
    from flows.studies.runner import run_study

    use_runtime(device, dtype)
    units = runner_settings(runner, address, workers, threads)
    settings = _settings(methods, {
        "stream_length": stream_length, "batch_size": batch_size, "eval_every": eval_every,
        "general_items": general_items, "canary_tokens": canary_tokens, "pilots": pilots,
        "eval_every_dense": eval_every_dense, "dense_until": dense_until,
        "retention_sample": retention_sample, "compute_dtype": compute_dtype})
    t0 = time.perf_counter()
    with prefect_night():
        res = run_study(horizon_study, units, model, settings, source, out_root, tracking_uri,
                        retention_shards=retention_shards)
    out.print(_results_table(res, settings, stream_length))
    out.print(precision.describe_machine(), highlight=False)
    out.print(f"wrote {res['results_path']} and {res['plot_path']} in {time.perf_counter() - t0:.0f} s "
              f"({units.kind} runner, {units.threads or 'default'} torch threads per method)")


def _settings(methods: str | None, given: dict):
    """HorizonSettings from the options given (None: the study's default); a bad value is a usage error."""
    from flows.studies.horizon import HorizonSettings

    try:
        if methods is not None:
            given["methods"] = tuple(m.strip() for m in methods.split(",") if m.strip())
        return HorizonSettings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _results_table(res: dict, settings, stream_length: int | None) -> Table:
    """One row per method: where it collapsed, its final scores and its seconds per edit."""
    table = Table("method", "collapse point", "editing score", "ES/PS/NS", "ppl ratio", "norm ratio", "s/edit",
                  "with measurements",
                  title=f"horizon study: {res['model']}, {settings.stream_length} edits, batch {settings.batch_size}")
    for label, r in res["methods"].items():
        m = r["final"]["metrics"]
        cp = r["collapse_point"]

        def f(key, fmt="{:.1f}", m=m):
            return "-" if m.get(key) is None else fmt.format(m[key])

        table.add_row(label, f"{cp} edits" if cp else f"none within {stream_length}", f("editing_score"),
                      f"{f('efficacy_success')}/{f('generalisation_success')}/{f('specificity_success')}",
                      f("perplexity_ratio", "{:.2f}"), f("norm_ratio_max", "{:.3f}"),
                      f"{r['final'].get('seconds_per_edit', float('nan')):.2f}",
                      f"{r['final'].get('seconds_per_edit_all', float('nan')):.2f}")
    return table
