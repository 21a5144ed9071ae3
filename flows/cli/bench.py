"""``nas bench ...`` on single edits from the base model: efficacy, the fall of ROME, speed,
the statistics pass, the layer sweep and causal tracing. Each prints its numbers and writes a JSON.

The editing-horizon study (``nas bench horizon``, ``nas bench speed --stream``) is in
:mod:`flows.cli.horizon`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from flows.cli.common import (
    AddressOpt,
    ComputeOpt,
    ConfigOpt,
    ModelOpt,
    RunnerOpt,
    ThreadsOpt,
    WorkersOpt,
    base_session,
    fetch_and_load,
    model_config,
    out,
    prefect_night,
    progress_bar,
    roots,
    runner_settings,
)
from flows.cli.horizon import stream_speed
from nas_core.editors import METHODS

commands = typer.Typer()


DEFAULT_EFFICACY_METHODS = ",".join(f"{m}+nas" for m in METHODS)


def _with_dtype(compute_dtype: str | None):
    """A settings_fn that forces the v* compute path (None: keep the config's)."""
    if compute_dtype is None:
        return None
    from flows.engine import precision

    return lambda s: precision.with_path(s, compute_dtype)


@commands.command("efficacy")
def bench_efficacy(
    model: ModelOpt = "smollm2-135m",
    methods: Annotated[str, typer.Option(help="comma-separated method[+nas] list")] = DEFAULT_EFFICACY_METHODS,
    cases: Annotated[int, typer.Option(help="first N cases of counterfact_500.json")] = 20,
    pilots: Annotated[int | None, typer.Option(help="override the NAS pilot count")] = None,
    compute_dtype: ComputeOpt = None,
    out_file: Annotated[Path, typer.Option("--out")] = Path("bench/efficacy.json"),
) -> None:
    """Each of the first N CounterFact cases edited alone from the base model, per method.

    Example: nas bench efficacy --methods alphaedit+nas --compute-dtype bfloat16
    """
    from flows.engine import precision
    from flows.studies import bench

    def open_session(method: str, nas: bool):
        session = base_session(model, method, nas, pilots=pilots, settings_fn=_with_dtype(compute_dtype))
        out.print(precision.describe(session.settings), highlight=False)
        return session

    results = {}
    for row in bench.efficacy_study(methods.split(","), bench.counterfact_cases(roots(), cases), open_session):
        results[row.spec] = row.record
        out.print(f"{row.spec:14s} efficacy {row.efficacy}/{row.n}  paraphrase {row.paraphrase}/{row.n}"
                  f"  (base model: {row.base_efficacy}/{row.n})  median {row.median_seconds:.2f} s/edit")
    bench.write_json(out_file, results)


@commands.command("fall-of-rome")
def bench_fall_of_rome(
    model: ModelOpt = "smollm2-135m",
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = "rome,rome-classic",
    cases: Annotated[int, typer.Option(help="cases of each kind (subject first / ordinary)")] = 20,
    source: Annotated[Path | None, typer.Option(help="CounterFact JSON (EasyEdit layout)")] = None,
    out_file: Annotated[Path, typer.Option("--out")] = Path("bench/fall-of-rome.json"),
) -> None:
    """Single edits from the base model: the share that blows the model up (canary perplexity
    more than 2x, or an update norm more than 10x the method's median), for cases whose subject
    is the prompt's first token and for ordinary ones.

    Example: nas bench fall-of-rome --methods rome,rome-classic --cases 20
    """
    from flows.studies import bench, fall_of_rome
    from flows.studies.horizon import stream_requests

    s = fall_of_rome.FallSettings(cases=cases)
    kinds = fall_of_rome.split_cases(stream_requests(source or roots().horizon_stream, 10_000), cases)
    doc = fall_of_rome.document(kinds, s)
    for method in methods.split(","):
        session = base_session(model, method, False)
        res = fall_of_rome.fall_of_method(session, kinds, model_config(model, None).eval, roots(), s)
        doc["methods"][method] = res.record()
        for k, summ in res.summary.items():
            out.print(f"{method:13s} {k:14s} {summ['blown_up']}/{summ['edits']} blew up"
                      f" ({summ['refused']} refused)")
    bench.write_json(out_file, doc)
    out.print(f"wrote {out_file}")


@commands.command("speed")
def bench_speed(
    model: ModelOpt = "smollm2-135m",
    method: str = "alphaedit",
    nas: Annotated[bool, typer.Option("--nas/--no-nas")] = True,
    cases: int = 10,
    pilots: Annotated[int | None, typer.Option(help="override the NAS pilot count")] = None,
    compute_dtype: ComputeOpt = None,
    stream: Annotated[int | None, typer.Option(help="instead: edit a stream of N CounterFact requests, "
                                                    "measured like the horizon study, and print the "
                                                    "amortised s/edit with measurements")] = None,
    batch_size: Annotated[int, typer.Option(help="requests per edit call of --stream")] = 10,
    out_file: Annotated[Path, typer.Option("--out")] = Path("bench/speed.json"),
) -> None:
    """Single-request edits vs one batch of the same requests: seconds per edit and efficacy.

    With --stream N: the throughput of a long stream (the horizon study's flow and measurement
    schedule for one method, in bench/stream/), where the time goes, and the amortised target.
    Example: nas bench speed --compute-dtype bfloat16 --pilots 30
    Example: nas bench speed --stream 1000 --batch-size 10
    """
    from flows.engine import precision
    from flows.studies import bench

    if stream is not None:
        stream_speed(model, f"{method}{'+nas' if nas else ''}", stream, batch_size, pilots, compute_dtype)
        return
    session = base_session(model, method, nas, pilots=pilots, settings_fn=_with_dtype(compute_dtype))
    r = bench.speed(session, bench.counterfact_cases(roots(), cases))
    r.update({"compute_dtype": session.compute_dtype, **precision.cpu_facts()})
    bench.write_json(out_file, r)
    out.print(precision.describe(session.settings), highlight=False)
    out.print(f"{method}{'+nas' if nas else ''} on {session.model_name}, {torch.get_num_threads()} threads")
    out.print(f"  single edit: median {r['single_median_s']:.2f} s (efficacy {r['single_efficacy']:.0%})")
    out.print(f"  batch of {cases}: {r['batch_per_edit_s']:.2f} s/edit (efficacy {r['batch_efficacy']:.0%}); "
              f"{r['speedup_per_edit']:.1f}x faster per edit; phases {r['batch_timings']}")


@commands.command("stats")
def bench_stats(
    model: ModelOpt = "smollm2-135m",
    tokens: Annotated[int, typer.Option(help="corpus tokens to measure over")] = 250_000,
    config: ConfigOpt = None,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16", help="also run the pass with a bfloat16 forward and "
                                       "report its time and its null-space difference")] = False,
    out_file: Annotated[Path, typer.Option("--out")] = Path("bench/stats.json"),
) -> None:
    """Time the one-pass covariance statistics (nothing cached) against this machine's GEMM roofline.

    Example: nas bench stats --tokens 250000 --bf16
    """
    from flows.engine import precision
    from flows.studies import bench

    cfg = model_config(model, config)
    m, tok, name, _ = fetch_and_load(model)
    layers = cfg.all_layers()
    out.print(precision.describe(cfg.method("alphaedit")).split(";")[0], highlight=False)
    with progress_bar() as bar:
        task = bar.add_task("covariance", total=tokens, rate="")
        r = bench.time_stats(m, tok, layers, cfg.stats, tokens, roots().wikitext,
                             progress=lambda n: bar.advance(task, n))
    cov32 = r.pop("cov")
    if bf16:
        with progress_bar() as bar:
            task = bar.add_task("covariance (bf16 forward)", total=tokens, rate="")
            rb = bench.time_stats(m, tok, layers, cfg.stats, tokens, roots().wikitext,
                                  progress=lambda n: bar.advance(task, n), forward_dtype=torch.bfloat16)
        angles = bench.null_space_angles(cov32, rb.pop("cov"), cfg.alphaedit)
        r["bf16"] = {**rb, "null_space_vs_float32": angles}
        out.print(f"bf16 forward: {rb['seconds']:.1f} s ({rb['tokens_per_s']:.0f} tokens/s; float32 forward "
                  f"{r['seconds']:.1f} s); 250k tokens at this rate: {rb['seconds_250k_at_this_rate']:.0f} s")
        out.print("  largest principal angle between the float32 and bf16 null spaces: " + ", ".join(
            f"L{k} {v['max_angle_deg']:.2f} deg (dim {v['dim_a']} vs {v['dim_b']})" for k, v in angles.items()))
    bench.write_json(out_file, {"model": name, **r, **precision.cpu_facts()})
    f = r["flops_per_token"]
    out.print(f"{name}: {r['tokens']} tokens, layers {layers} in one pass: {r['seconds']:.1f} s "
              f"({r['tokens_per_s']:.0f} tokens/s, {r['threads']} threads); 250k tokens at this rate: "
              f"{r['seconds_250k_at_this_rate']:.0f} s")
    out.print(f"  work: {f['total'] / 1e6:.1f} MFLOP/token ({f['forward'] / 1e6:.1f} forward through blocks "
              f"0-{max(layers)}, {f['covariance'] / 1e6:.1f} covariance); achieved {r['achieved_gflops']:.0f} "
              f"GFLOP/s of this machine's {r['gemm_peak_gflops']:.0f} GFLOP/s float32 GEMM peak")
    out.print(f"  floor for 250k tokens at that peak: {r['floor_seconds_250k']:.0f} s")


@commands.command("layer-sweep")
def bench_layer_sweep(
    model: ModelOpt = "smollm2-135m",
    layers: Annotated[str, typer.Option(help="comma-separated layers")] = "1,2,3,4,5,6,7,8,9,10,12,14",
    cases: int = 20,
    out_file: Annotated[Path, typer.Option("--out")] = Path("bench/layer_sweep.json"),
    runner: RunnerOpt = "sequential",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """r-ROME (NAS off) at each layer alone: where do edits stick and generalise? (A Prefect flow, a task
    per layer.)

    Example: nas bench layer-sweep --layers 2,4,6,8 --cases 20 --runner dask --workers 2 --threads 1
    """
    from flows.studies import bench
    from flows.studies.runner import run_study
    from flows.studies.sweep import layer_sweep_study

    try:
        ls = [int(x) for x in layers.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--layers must be comma-separated integers, got {layers!r}") from None
    units = runner_settings(runner, address, workers, threads)
    results = {}
    with prefect_night():
        rows = run_study(layer_sweep_study, units, model, ls, cases)
    for row in rows:
        results[row.layer] = row.record
        ns = "-" if row.neighbourhood_kept_pct is None else f"{row.neighbourhood_kept_pct:.0f}%"
        out.print(f"layer {row.layer:2d}: efficacy {row.efficacy}/{cases}  paraphrase {row.paraphrase}/{cases}"
                  f"  neighbourhood kept {ns}  {row.median_seconds:.1f} s/edit")
    bench.write_json(out_file, results)


@commands.command("trace")
def bench_trace(
    model: ModelOpt = "smollm2-135m",
    cases: Annotated[int, typer.Option(help="the CounterFact cases (of 500) whose true answer the model finds "
                                            "most probable")] = 20,
    samples: Annotated[int | None, typer.Option(help="noise draws per case [default: 5]")] = None,
    window: Annotated[int | None, typer.Option(help="MLP layers restored together [default: 5]")] = None,
    band: Annotated[int | None, typer.Option(help="width of the band to choose [default: the config's]")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="[default: bench/trace-MODEL.json]")] = None,
) -> None:
    """Causal tracing (ROME): the indirect effect of each layer's MLP at the subject's last token.

    Example: nas bench trace --cases 10
    """
    from flows.studies import bench, causal_trace

    try:
        settings = causal_trace.trace_settings(samples, window)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    cfg = model_config(model, None)
    m, tok, name, _ = fetch_and_load(model)
    reqs = causal_trace.best_known(m, tok, bench.counterfact_cases(roots(), 500), cases)
    with progress_bar() as bar:
        task = bar.add_task("causal trace", total=len(reqs), rate="")
        study = causal_trace.trace_study(m, tok, name, reqs, settings, band or len(cfg.alphaedit.layers),
                                         cfg.alphaedit.layers, progress=lambda k: bar.advance(task, k))
    res, effect, chosen, without_first = study.result, study.result.indirect_effect, study.chosen, study.without_first
    table = Table("layer", "indirect effect", "", title=f"causal trace of MLP states: {name}, {len(reqs)} known cases, "
                  f"window {settings.window}, {settings.samples} noise draws")
    peak = float(effect.max()) or 1.0
    for layer, e in enumerate(effect.tolist()):
        mark = (" <" if layer in chosen else "") + (" *" if layer in without_first else "")
        table.add_row(str(layer), f"{e:+.4f}", "#" * max(0, round(30 * e / peak)) + mark)
    out.print(table)
    drop = res.mean_p_clean - res.mean_p_corrupt
    share = f" (the peak restores {float(effect.max()) / drop:.0%} of it)" if drop > 0 else ""
    out.print(f"p(true) clean {res.mean_p_clean:.3f}, subject corrupted {res.mean_p_corrupt:.3f}{share}; "
              f"best band of {study.width} (<): layers {chosen[0]}-{chosen[-1]}; best band of windows that leave "
              f"layer 0 out (*): {without_first[0]}-{without_first[-1]}; config: {list(cfg.alphaedit.layers)}; "
              f"{study.seconds:.0f} s")
    bench.write_json(out_file or Path(f"bench/trace-{name}.json"), study.document())
