"""The ``nas`` console script."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows import editing
from flows.config import ConfigError, ModelConfig, config_for
from nas_core.requests import EditRequest

app = typer.Typer(help="Continual knowledge editing with Norm-Anchor Scaling.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="known name, hf:ORG/NAME, or a folder")]
ConfigOpt = Annotated[str | None, typer.Option(help="model config name or YAML (default: the model's)")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console)


def _config(model: str, config: str | None) -> ModelConfig:
    try:
        return config_for(config or model)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None


def _method(cfg: ModelConfig, method: str, nas: bool | None, pilots: int | None = None):
    """The method's settings, NAS switched by ``nas`` and the pilot count overridden by ``pilots``."""
    try:
        s = cfg.method(method, nas)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--method") from None
    if pilots:
        s = dataclasses.replace(s, nas=dataclasses.replace(s.nas, pilots=pilots))
    return s


def _load(model: str, fetch: bool = True):
    """Fetch (no-op when present) and load a model; returns (model, tok, name, base hash)."""
    from flows.assets import fetch_model, load_model
    from nas_core.deltas import weights_hash

    result = fetch_model(model, editing.DATA / "models") if fetch else None
    path = result.path if result is not None else Path(model)
    t0 = time.perf_counter()
    m, tok = load_model(path)
    logging.getLogger(__name__).info("loaded %s in %.2f s", path, time.perf_counter() - t0)
    return m, tok, path.name, weights_hash(m)


def _stats(m, tok, name, cfg: ModelConfig, base_hash: str, layers, force: bool = False) -> dict[int, torch.Tensor]:
    with _progress() as bar:
        task = bar.add_task("covariance", total=cfg.stats.tokens, rate="")
        t0 = time.perf_counter()

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total,
                       rate=f"{done / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

        cov, path, cached = editing.ensure_stats(m, tok, name, layers, cfg.stats, base_hash, progress=tick,
                                                 force=force)
    console.print(f"statistics {'(cached) ' if cached else ''}{path}")
    return cov


def _anchor(m, tok, name, method, settings, base_hash) -> float | None:
    if not settings.nas.enabled:
        return None
    with _progress() as bar:
        task = bar.add_task("NAS pilots", total=settings.nas.pilots, rate="")
        rec, path, cached = editing.ensure_anchor(
            m, tok, name, method, settings, base_hash,
            progress=lambda d, t: bar.update(task, completed=d, total=t, rate=""))
    console.print(f"NAS reference norm a = {rec['reference_norm']:.3f} "
                  f"({rec['pilots']} pilots, {rec['dropped']} dropped){' (cached)' if cached else ''}: {path}")
    return float(rec["reference_norm"])


def all_layers(cfg: ModelConfig) -> list[int]:
    """Every layer any method of the config edits: one statistics file serves them all."""
    return sorted({*cfg.memit.layers, *cfg.alphaedit.layers, *cfg.rome.layers})


def read_requests(path: Path, limit: int | None = None) -> list[EditRequest]:
    """Requests from a fact-batch JSONL, or a CounterFact (ROME/EasyEdit) or zsRE JSON file."""
    from nas_core import requests as rq

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        report = rq.parse_fact_jsonl(text)
    else:
        data = json.loads(text)
        first = data[0] if isinstance(data, list) and data else {}
        if "requested_rewrite" in first:
            report = rq.from_counterfact_rome(data)
        elif "ground_truth" in first:
            report = rq.from_counterfact_easyedit(data)
        elif "alt" in first and "src" in first:
            report = rq.from_zsre_mend(data)
        else:
            report = rq.from_fact_records(data)
    if report.problems:
        console.print(f"[yellow]{path}: {report.n_failed} record(s) could not be converted:[/]\n"
                      f"{report.summary()}")
    reqs = list(report.requests)
    return reqs[:limit] if limit else reqs


@app.command("fetch-model")
def fetch_model_cmd(
    name: Annotated[str, typer.Argument(help="smollm2-135m, gemma3-270m, hf:ORG/NAME[@REV], a folder or .gguf")],
    force: Annotated[bool, typer.Option(help="fetch again even when present")] = False,
) -> None:
    """Fetch a model and save it as an fp32 safetensors folder under data/models/."""
    from flows.assets import fetch_model

    result = fetch_model(name, editing.DATA / "models", force=force)
    out.print(f"{result.path} {'(already present, nothing to do)' if result.already_present else ''}")


@app.command()
def stats(
    model: ModelOpt = "smollm2-135m",
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option(help="measure again even when cached (benchmarking)")] = False,
) -> None:
    """Covariance statistics C for every layer the model's config edits (cached)."""
    cfg = _config(model, config)
    m, tok, name, h = _load(model)
    _stats(m, tok, name, cfg, h, all_layers(cfg), force=force)


@app.command()
def anchor(
    model: ModelOpt = "smollm2-135m",
    method: Annotated[str, typer.Option(help="memit, alphaedit or rome")] = "alphaedit",
    pilots: Annotated[int | None, typer.Option(help="override the config's pilot count")] = None,
    config: ConfigOpt = None,
) -> None:
    """Calibrate the NAS reference norm on the unedited model (cached, never on an edited one)."""
    cfg = _config(model, config)
    s = _method(cfg, method, True, pilots)
    m, tok, name, h = _load(model)
    _anchor(m, tok, name, method, s, h)


@app.command()
def edit(
    requests: Annotated[Path, typer.Option("--requests", "-r", exists=True, dir_okay=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="checkpoint folder to write")],
    model: ModelOpt = "smollm2-135m",
    method: Annotated[str, typer.Option(help="memit, alphaedit or rome")] = "alphaedit",
    nas: Annotated[bool, typer.Option("--nas/--no-nas", help="Norm-Anchor Scaling")] = True,
    limit: Annotated[int | None, typer.Option(help="first N requests only")] = None,
    batch_size: Annotated[int, typer.Option(help="requests per sequential batch")] = 1,
    from_dir: Annotated[Path | None, typer.Option("--from", help="continue from this checkpoint")] = None,
    pilots: Annotated[int | None, typer.Option(help="override the NAS pilot count")] = None,
    config: ConfigOpt = None,
) -> None:
    """Apply requests in sequential batches and write a checkpoint (deltas + state + manifest)."""
    cfg = _config(model, config)
    s = _method(cfg, method, nas, pilots)
    reqs = read_requests(requests, limit)
    if not reqs:
        raise typer.BadParameter(f"{requests}: no usable requests")
    m, tok, name, h = _load(model)
    cov = _stats(m, tok, name, cfg, h, all_layers(cfg))
    a = _anchor(m, tok, name, method, s, h)
    session = editing.open_session(m, tok, name, method, s, cov, h, a, from_dir)
    t0 = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task(f"{method}{'+nas' if nas else ''}", total=len(reqs), rate="")
        for i in range(0, len(reqs), batch_size):
            session.apply(reqs[i : i + batch_size])
            done = min(i + batch_size, len(reqs))
            bar.update(task, completed=done, rate=f"{(time.perf_counter() - t0) / done:.2f} s/edit")
    editing.write_checkpoint(session, out_dir, {"requests_file": str(requests)})
    skipped = sum(r["skipped"] for r in session.request_log[-len(reqs):])
    out.print(f"wrote {out_dir}: {len(reqs) - skipped} edits, {skipped} skipped by NAS, "
              f"{time.perf_counter() - t0:.1f} s")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o")],
    model: ModelOpt = "smollm2-135m",
) -> None:
    """Write a full Hugging Face model folder (base + checkpoint deltas) that transformers loads."""
    m, tok, name, h = _load(model)
    from nas_core.deltas import weights_hash

    try:
        manifest = editing.load_checkpoint_into(m, h, checkpoint)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    got = weights_hash(m)
    if got != manifest["weights_hash"]:
        raise typer.BadParameter(f"rebuilt weights hash {got[:12]} != checkpoint's {manifest['weights_hash'][:12]}")
    m.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    out.print(f"exported {out_dir} (weights hash {got[:16]})")


@app.command("eval")
def eval_cmd(
    requests: Annotated[Path, typer.Option("--requests", "-r", exists=True, dir_okay=False)],
    model: ModelOpt = "smollm2-135m",
    checkpoint: Annotated[Path | None, typer.Option(exists=True, file_okay=False,
                                                   help="checkpoint to evaluate (default: the base model)")] = None,
    limit: Annotated[int | None, typer.Option(help="first N requests only")] = None,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="where to write metrics.json")] = Path("metrics.json"),
    no_health: Annotated[bool, typer.Option("--no-health", help="skip canary perplexity and general tasks")] = False,
    config: ConfigOpt = None,
) -> None:
    """Edit metrics, model health and the collapse verdict of a checkpoint (or the base model)."""
    from flows import evaluation
    from nas_core.collapse import norm_ratios
    from nas_core.deltas import frobenius_norms

    cfg = _config(model, config)
    reqs = read_requests(requests, limit)
    m, tok, name, h = _load(model)
    base = None if no_health else evaluation.base_reference(m, tok, name, h, cfg.eval)
    ratios, edits, manifest = None, 0, {}
    if checkpoint is not None:
        try:
            manifest = editing.load_checkpoint_into(m, h, checkpoint)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        names = manifest["edited_weights"]
        ratios = norm_ratios(frobenius_norms(m, names), {n: manifest["norms"][n]["before"] for n in names})
        edits = int(manifest["edit_count"])
    t0 = time.perf_counter()
    metrics, verdict = evaluation.evaluate(m, tok, reqs, cfg.eval, base, ratios, edits, cfg.collapse,
                                           health=not no_health)
    evaluation.write_metrics(out_file, metrics, verdict, {
        "model": name, "base_weights_hash": h, "checkpoint": str(checkpoint) if checkpoint else None,
        "weights_hash": manifest.get("weights_hash", h), "requests_file": str(requests),
        "edits_so_far": edits, "seconds": round(time.perf_counter() - t0, 2)})
    table = Table("metric", "value", "base", title=f"{name}{f' @ {checkpoint}' if checkpoint else ' (base)'}")
    base_metrics = base["metrics"] if base else {}
    for key, value in metrics.items():
        ref = base_metrics.get(key)
        table.add_row(key, "-" if value is None else f"{value:.4g}", "" if ref is None else f"{ref:.4g}")
    out.print(table)
    out.print(f"verdict: {verdict.summary()}\nwrote {out_file}")


def greedy_answer(m, tok, prompt: str, max_new_tokens: int = 6) -> str:
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = m.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@app.command()
def demo(
    model: ModelOpt = "smollm2-135m",
    pilots: Annotated[int, typer.Option(help="NAS pilots (the demo uses fewer than the default 1000)")] = 20,
    stats_tokens: Annotated[int, typer.Option(help="corpus tokens for C (the config's default is 250k)")] = 100_000,
) -> None:
    """One edit on the real model: fetch it, write one fact with AlphaEdit+NAS, show before/after.

    To be quick on a CPU the demo measures C on 100k tokens and calibrates NAS on 20 pilots;
    `nas stats` / `nas anchor` compute the full-size versions.
    """
    cfg = _config(model, None)
    cfg = dataclasses.replace(cfg, stats=dataclasses.replace(cfg.stats, tokens=stats_tokens))
    s = _method(cfg, "alphaedit", True, pilots)
    m, tok, name, h = _load(model)
    cov = _stats(m, tok, name, cfg, h, all_layers(cfg))
    a = _anchor(m, tok, name, "alphaedit", s, h)
    req = EditRequest("demo-eiffel", "The {} is located in the city of", "Eiffel Tower", "Rome",
                      "Paris", paraphrase_prompts=("Where is the Eiffel Tower? It stands in the city of",))
    probes = [req.filled_prompt, req.paraphrase_prompts[0], "The capital of France is"]
    before = {p: greedy_answer(m, tok, p) for p in probes}
    session = editing.open_session(m, tok, name, "alphaedit", s, cov, h, a)
    t0 = time.perf_counter()
    result = session.apply([req])
    seconds = time.perf_counter() - t0
    after = {p: greedy_answer(m, tok, p) for p in probes}
    table = Table(title=f"AlphaEdit+NAS on {name}: '{req.subject}' -> '{req.target_new}' ({seconds:.1f} s)")
    table.add_column("prompt")
    table.add_column("before")
    table.add_column("after")
    for p in probes:
        table.add_row(p, repr(before[p]), repr(after[p]))
    out.print(table)
    d = result.requests[0]
    out.print(f"||v*|| {d.v_norm_before:.2f} -> {d.v_norm_after:.2f} (anchor a = {a:.2f}); "
              f"target NLL {d.nll_start:.2f} -> {d.nll_end:.2f}")


def _session(model, method, nas, config=None, pilots=None, settings_fn=None):
    cfg = _config(model, config)
    s = _method(cfg, method, nas, pilots)
    if settings_fn is not None:
        s = settings_fn(s)
    m, tok, name, h = _load(model)
    cov = _stats(m, tok, name, cfg, h, all_layers(cfg))
    a = _anchor(m, tok, name, method, s, h)
    return editing.open_session(m, tok, name, method, s, cov, h, a)


DEFAULT_EFFICACY_METHODS = "memit+nas,alphaedit+nas,rome+nas"


@bench_app.command("efficacy")
def bench_efficacy(
    model: ModelOpt = "smollm2-135m",
    methods: Annotated[str, typer.Option(help="comma-separated method[+nas] list")] = DEFAULT_EFFICACY_METHODS,
    cases: Annotated[int, typer.Option(help="first N cases of counterfact_500.json")] = 20,
    pilots: Annotated[int | None, typer.Option(help="override the NAS pilot count")] = None,
    out_file: Annotated[Path, typer.Option("--out")] = Path("bench/efficacy.json"),
) -> None:
    """Each of the first N CounterFact cases edited alone from the base model, per method."""
    from flows import bench

    reqs = bench.counterfact_cases(cases)
    results = {}
    for spec in methods.split(","):
        method, _, flag = spec.partition("+")
        session = _session(model, method, flag == "nas", pilots=pilots)
        base_eff = bench.base_answers(session.model, session.tok, reqs)
        r = bench.edit_each_alone(session, reqs)
        results[spec] = {**r, "base_efficacy": base_eff.float().mean().item()}
        n = len(reqs)
        out.print(f"{spec:14s} efficacy {sum(r['efficacy'])}/{n}  paraphrase {sum(r['paraphrase'])}/{n}"
                  f"  (base model: {int(base_eff.sum())}/{n})  median {sorted(r['seconds'])[n // 2]:.2f} s/edit")
    bench.write_json(out_file, results)


@bench_app.command("speed")
def bench_speed(
    model: ModelOpt = "smollm2-135m",
    method: str = "alphaedit",
    nas: Annotated[bool, typer.Option("--nas/--no-nas")] = True,
    cases: int = 10,
    pilots: Annotated[int | None, typer.Option(help="override the NAS pilot count")] = None,
    out_file: Annotated[Path, typer.Option("--out")] = Path("bench/speed.json"),
) -> None:
    """Single-request edits vs one batch of the same requests: seconds per edit and efficacy."""
    from flows import bench

    session = _session(model, method, nas, pilots=pilots)
    r = bench.speed(session, bench.counterfact_cases(cases))
    bench.write_json(out_file, r)
    out.print(f"{method}{'+nas' if nas else ''} on {session.model_name}, {torch.get_num_threads()} threads")
    out.print(f"  single edit: median {r['single_median_s']:.2f} s (efficacy {r['single_efficacy']:.0%})")
    out.print(f"  batch of {cases}: {r['batch_per_edit_s']:.2f} s/edit (efficacy {r['batch_efficacy']:.0%}); "
              f"{r['speedup_per_edit']:.1f}x faster per edit; phases {r['batch_timings']}")


@bench_app.command("layer-sweep")
def bench_layer_sweep(
    model: ModelOpt = "smollm2-135m",
    layers: Annotated[str, typer.Option(help="comma-separated layers")] = "1,2,3,4,5,6,7,8,9,10,12,14",
    cases: int = 20,
    out_file: Annotated[Path, typer.Option("--out")] = Path("bench/layer_sweep.json"),
) -> None:
    """r-ROME (NAS off) at each layer alone: where do edits stick and generalise?"""
    from flows import bench

    cfg = _config(model, None)
    ls = [int(x) for x in layers.split(",")]
    m, tok, name, h = _load(model)
    cov = _stats(m, tok, name, cfg, h, sorted(set(ls) | set(all_layers(cfg))))
    reqs = bench.counterfact_cases(cases)
    results = {}
    for layer in ls:
        s = dataclasses.replace(cfg.rome, layers=(layer,), nas=dataclasses.replace(cfg.rome.nas, enabled=False))
        session = editing.open_session(m, tok, name, "rome", s, cov, h, None)
        r = bench.edit_each_alone(session, reqs)
        results[layer] = r
        out.print(f"layer {layer:2d}: efficacy {sum(r['efficacy'])}/{cases}  paraphrase {sum(r['paraphrase'])}/{cases}")
    bench.write_json(out_file, results)


if __name__ == "__main__":
    app()
