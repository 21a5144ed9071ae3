"""``nas bench ...`` on single edits from the base model: efficacy, the fall of ROME, speed,
the statistics pass, the layer sweep and causal tracing. Each prints its numbers and writes a JSON.

The editing-horizon study (``nas bench horizon``, ``nas bench speed --stream``) is in
:mod:`flows.cli.horizon`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from flows.cli.common import (
    ComputeOpt,
    ConfigOpt,
    ModelOpt,
    base_session,
    covariance_stats,
    fetch_and_load,
    model_config,
    out,
    progress_bar,
    roots,
)
from flows.cli.horizon import stream_speed
from flows.engine import editing
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

    reqs = bench.counterfact_cases(roots(), cases)
    results = {}
    for spec in methods.split(","):
        method, _, flag = spec.partition("+")
        session = base_session(model, method, flag == "nas", pilots=pilots, settings_fn=_with_dtype(compute_dtype))
        out.print(precision.describe(session.settings), highlight=False)
        base_eff = bench.base_answers(session.model, session.tok, reqs)
        r = bench.edit_each_alone(session, reqs)
        results[spec] = {**r, "base_efficacy": base_eff.float().mean().item(), "compute_dtype": session.compute_dtype,
                         **precision.cpu_facts()}
        n = len(reqs)
        out.print(f"{spec:14s} efficacy {sum(r['efficacy'])}/{n}  paraphrase {sum(r['paraphrase'])}/{n}"
                  f"  (base model: {int(base_eff.sum())}/{n})  median {sorted(r['seconds'])[n // 2]:.2f} s/edit")
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
    import dataclasses as dc

    from flows.engine import evaluation, precision
    from flows.studies import bench, fall_of_rome
    from flows.studies.horizon import stream_requests
    from nas_core.evaluate.health import perplexity

    s = fall_of_rome.FallSettings(cases=cases)
    kinds = fall_of_rome.split_cases(stream_requests(source or roots().horizon_stream, 10_000), cases)
    doc: dict = {"settings": dc.asdict(s), "cases": {k: [r.case_id for r in v] for k, v in kinds.items()},
                 "methods": {}, **precision.cpu_facts()}
    for method in methods.split(","):
        session = base_session(model, method, False)
        cfg = model_config(model, None)
        canary, _ = evaluation.canary_ids(session.tok, dc.replace(cfg.eval, canary_tokens=s.canary_tokens), roots())
        base_ppl = perplexity(session.model, canary, window=cfg.eval.canary_window)
        rows = {k: [fall_of_rome.edit_alone(session, r, canary, cfg.eval.canary_window) for r in v]
                for k, v in kinds.items()}
        flat = fall_of_rome.verdicts([r for v in rows.values() for r in v], base_ppl, s)
        judged, i = {}, 0
        for k, v in rows.items():
            judged[k], i = flat[i : i + len(v)], i + len(v)
        doc["methods"][method] = {"base_perplexity": base_ppl, "summary": fall_of_rome.summary(judged),
                                  "edits": judged, "compute_dtype": session.compute_dtype}
        for k, summ in doc["methods"][method]["summary"].items():
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
        a = cfg.alphaedit
        cut = (a.nullspace_threshold, a.nullspace_relative_threshold)
        angles = {layer: bench.max_principal_angle(cov32[layer], c, *cut)
                  for layer, c in rb.pop("cov").items() if layer in a.layers}
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
) -> None:
    """r-ROME (NAS off) at each layer alone: where do edits stick and generalise?"""
    from flows.studies import bench

    cfg = model_config(model, None)
    ls = [int(x) for x in layers.split(",")]
    m, tok, name, h = fetch_and_load(model)
    cov = covariance_stats(m, tok, name, cfg, h, sorted(set(ls) | set(cfg.all_layers())))
    reqs = bench.counterfact_cases(roots(), cases)
    results = {}
    for layer in ls:
        s = dataclasses.replace(cfg.rome, layers=(layer,), nas=dataclasses.replace(cfg.rome.nas, enabled=False))
        session = editing.open_session(m, tok, name, "rome", s, cov, h, None)
        r = bench.edit_each_alone(session, reqs)
        results[layer] = r
        specs = [x for x in r["specificity"] if x is not None]
        ns = f"{100 * sum(specs) / len(specs):.0f}%" if specs else "-"
        out.print(f"layer {layer:2d}: efficacy {sum(r['efficacy'])}/{cases}  paraphrase {sum(r['paraphrase'])}/{cases}"
                  f"  neighbourhood kept {ns}  {statistics.median(r['seconds']):.1f} s/edit")
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
    """Causal tracing (ROME): the indirect effect of each layer's MLP at the subject's last token."""
    from flows.studies import bench
    from nas_core.settings import TraceSettings
    from nas_core.spec import spec_for
    from nas_core.trace import answer_probability, best_band, causal_trace, first_mlp_free

    try:
        settings = TraceSettings(**{k: v for k, v in {"samples": samples, "window": window}.items() if v is not None})
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    cfg = model_config(model, None)
    m, tok, name, _ = fetch_and_load(model)
    width = band or len(cfg.alphaedit.layers)
    # Trace the facts the model knows best: a fact it barely predicts has no recall to locate.
    pool = bench.counterfact_cases(roots(), 500)
    p_true = answer_probability(m, tok, pool)
    reqs = [pool[i] for i in p_true.argsort(descending=True)[:cases].tolist()]
    t0 = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("causal trace", total=len(reqs), rate="")
        res = causal_trace(m, tok, spec_for(m), reqs, settings, progress=lambda k: bar.advance(task, k))
    seconds = time.perf_counter() - t0
    effect = res.indirect_effect
    chosen = best_band(effect, width)
    without_first = best_band(effect, width, lowest=first_mlp_free(settings.window))
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
              f"best band of {width} (<): layers {chosen[0]}-{chosen[-1]}; best band of windows that leave layer 0 "
              f"out (*): {without_first[0]}-{without_first[-1]}; config: {list(cfg.alphaedit.layers)}; {seconds:.0f} s")
    bench.write_json(out_file or Path(f"bench/trace-{name}.json"), {
        "model": name, "cases": [r.case_id for r in reqs], "settings": dataclasses.asdict(settings),
        "noise_std": res.noise_std, "p_clean": res.mean_p_clean, "p_corrupt": res.mean_p_corrupt,
        "indirect_effect": effect.tolist(), "best_band": list(chosen),
        "best_band_without_layer_0": list(without_first), "config_layers": list(cfg.alphaedit.layers),
        "per_case": {c.case_id: {"p_clean": c.p_clean, "p_corrupt": c.p_corrupt,
                                 "p_restored": c.p_restored.tolist()} for c in res.cases},
        "seconds": seconds})

