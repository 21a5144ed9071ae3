"""The ``nas`` console script."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from flows.config.model import ConfigError, ModelConfig, config_for
from flows.engine import editing
from flows.engine.caches import ensure_anchor, ensure_stats
from flows.engine.checkpoints import load_checkpoint_into, write_checkpoint
from flows.paths import ENV_PROJECT, Roots, project_root
from nas_core.requests import EditRequest

app = typer.Typer(help="Continual knowledge editing with Norm-Anchor Scaling.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="known name, hf:ORG/NAME, or a folder")]
ConfigOpt = Annotated[str | None, typer.Option(help="model config name or YAML (default: the model's)")]


ProjectOpt = Annotated[Path | None, typer.Option(
    "--project", help=f"project directory: params.yaml, data/, configs/ (default: ${ENV_PROJECT}, else the "
                      "working one)")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False, project: ProjectOpt = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if project is not None:  # the one place the project is chosen; flows and child processes inherit it
        os.environ[ENV_PROJECT] = str(project_root(project))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console)


def _roots() -> Roots:
    """The project's folders (params.yaml ``paths``; defaults without a params.yaml)."""
    from flows.config.params import load_params

    try:
        return load_params().roots
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="params.yaml") from None


def _config(model: str, config: str | None) -> ModelConfig:
    try:
        return config_for(config or model, _roots().configs)
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
    from flows.assets.models import fetch_model, load_model
    from nas_core.deltas import weights_hash

    result = fetch_model(model, _roots().models) if fetch else None
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

        cov, path, cached = ensure_stats(m, tok, name, layers, cfg.stats, base_hash, _roots(), progress=tick,
                                                 force=force)
    console.print(f"statistics {'(cached) ' if cached else ''}{path}")
    return cov


def _anchor(m, tok, name, method, settings, base_hash) -> float | None:
    if not settings.nas.enabled:
        return None
    with _progress() as bar:
        task = bar.add_task("NAS pilots", total=settings.nas.pilots, rate="")
        rec, path, cached = ensure_anchor(
            m, tok, name, method, settings, base_hash, _roots(),
            progress=lambda d, t: bar.update(task, completed=d, total=t, rate=""))
    console.print(f"NAS reference norm a = {rec['reference_norm']:.3f} "
                  f"({rec['pilots']} pilots, {rec['dropped']} dropped){' (cached)' if cached else ''}: {path}")
    return float(rec["reference_norm"])


def read_requests(path: Path, limit: int | None = None) -> list[EditRequest]:
    """Requests from a fact-batch JSONL, or a CounterFact (ROME/EasyEdit) or zsRE JSON file."""
    from nas_core import formats as rq

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
    from flows.assets.models import fetch_model

    result = fetch_model(name, _roots().models, force=force)
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
    _stats(m, tok, name, cfg, h, cfg.all_layers(), force=force)


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
    cov = _stats(m, tok, name, cfg, h, cfg.all_layers())
    a = _anchor(m, tok, name, method, s, h)
    session = editing.open_session(m, tok, name, method, s, cov, h, a, from_dir)
    t0 = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task(f"{method}{'+nas' if nas else ''}", total=len(reqs), rate="")
        for i in range(0, len(reqs), batch_size):
            session.apply(reqs[i : i + batch_size])
            done = min(i + batch_size, len(reqs))
            bar.update(task, completed=done, rate=f"{(time.perf_counter() - t0) / done:.2f} s/edit")
    write_checkpoint(session, out_dir, {"requests_file": str(requests)})
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
        manifest = load_checkpoint_into(m, h, checkpoint)
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
    from flows.engine import evaluation
    from nas_core.collapse import norm_ratios
    from nas_core.deltas import frobenius_norms

    cfg = _config(model, config)
    reqs = read_requests(requests, limit)
    m, tok, name, h = _load(model)
    base = None if no_health else evaluation.base_reference(m, tok, name, h, cfg.eval, _roots())
    ratios, edits, manifest = None, 0, {}
    if checkpoint is not None:
        try:
            manifest = load_checkpoint_into(m, h, checkpoint)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        names = manifest["edited_weights"]
        ratios = norm_ratios(frobenius_norms(m, names), {n: manifest["norms"][n]["before"] for n in names})
        edits = int(manifest["edit_count"])
    t0 = time.perf_counter()
    metrics, verdict = evaluation.evaluate(m, tok, reqs, cfg.eval, base, _roots(), ratios, edits, cfg.collapse,
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
    cov = _stats(m, tok, name, cfg, h, cfg.all_layers())
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
    cov = _stats(m, tok, name, cfg, h, cfg.all_layers())
    a = _anchor(m, tok, name, method, s, h)
    return editing.open_session(m, tok, name, method, s, cov, h, a)


DEFAULT_EFFICACY_METHODS = "memit+nas,alphaedit+nas,rome+nas"

ComputeOpt = Annotated[str | None, typer.Option("--compute-dtype", help="v* compute path: auto, float32 or "
                                                "bfloat16 (default: the model config's)")]


def _with_dtype(compute_dtype: str | None):
    """A settings_fn that forces the v* compute path (None: keep the config's)."""
    if compute_dtype is None:
        return None
    from flows.engine import precision

    return lambda s: precision.with_path(s, compute_dtype)


@bench_app.command("efficacy")
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

    reqs = bench.counterfact_cases(_roots(), cases)
    results = {}
    for spec in methods.split(","):
        method, _, flag = spec.partition("+")
        session = _session(model, method, flag == "nas", pilots=pilots, settings_fn=_with_dtype(compute_dtype))
        out.print(precision.describe(session.settings), highlight=False)
        base_eff = bench.base_answers(session.model, session.tok, reqs)
        r = bench.edit_each_alone(session, reqs)
        results[spec] = {**r, "base_efficacy": base_eff.float().mean().item(), "compute_dtype": session.compute_dtype,
                         **precision.cpu_facts()}
        n = len(reqs)
        out.print(f"{spec:14s} efficacy {sum(r['efficacy'])}/{n}  paraphrase {sum(r['paraphrase'])}/{n}"
                  f"  (base model: {int(base_eff.sum())}/{n})  median {sorted(r['seconds'])[n // 2]:.2f} s/edit")
    bench.write_json(out_file, results)


@bench_app.command("fall-of-rome")
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
    kinds = fall_of_rome.split_cases(stream_requests(source or _roots().horizon_stream, 10_000), cases)
    doc: dict = {"settings": dc.asdict(s), "cases": {k: [r.case_id for r in v] for k, v in kinds.items()},
                 "methods": {}, **precision.cpu_facts()}
    for method in methods.split(","):
        session = _session(model, method, False)
        cfg = _config(model, None)
        canary, _ = evaluation.canary_ids(session.tok, dc.replace(cfg.eval, canary_tokens=s.canary_tokens), _roots())
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


@bench_app.command("speed")
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
        _stream_speed(model, f"{method}{'+nas' if nas else ''}", stream, batch_size, pilots, compute_dtype)
        return
    session = _session(model, method, nas, pilots=pilots, settings_fn=_with_dtype(compute_dtype))
    r = bench.speed(session, bench.counterfact_cases(_roots(), cases))
    r.update({"compute_dtype": session.compute_dtype, **precision.cpu_facts()})
    bench.write_json(out_file, r)
    out.print(precision.describe(session.settings), highlight=False)
    out.print(f"{method}{'+nas' if nas else ''} on {session.model_name}, {torch.get_num_threads()} threads")
    out.print(f"  single edit: median {r['single_median_s']:.2f} s (efficacy {r['single_efficacy']:.0%})")
    out.print(f"  batch of {cases}: {r['batch_per_edit_s']:.2f} s/edit (efficacy {r['batch_efficacy']:.0%}); "
              f"{r['speedup_per_edit']:.1f}x faster per edit; phases {r['batch_timings']}")


def _stream_speed(model: str, label: str, n: int, batch_size: int, pilots: int | None, compute_dtype) -> None:
    """``nas bench speed --stream``: one method of the horizon flow, its phases and the target."""
    from flows.engine import precision
    from flows.refresh import prefect_runtime
    from flows.studies.horizon import HorizonSettings, amortised_line, horizon_study

    try:
        settings = HorizonSettings(methods=(label,), stream_length=n, batch_size=batch_size, eval_every=250,
                                   eval_every_dense=100, dense_until=1000, pilots=pilots or 50,
                                   compute_dtype=compute_dtype or "auto")
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    prefect_runtime.claim_night()
    res = horizon_study(model, settings, None, Path("bench/stream"), None)
    points = res["methods"][label]["points"]
    table = Table("edits", "s/edit editing", "with measurements", "values", "keys", "solve", "write", "measure",
                  title=f"{label} on {res['model']}: a stream of {n} at batch {batch_size} (cumulative seconds)")
    for p in points:
        ph = p.get("phase_seconds", {})
        measured = sum(q["eval_seconds"] for q in points if q["edits"] <= p["edits"])
        table.add_row(str(p["edits"]), f"{p['seconds_per_edit']:.2f}", f"{p.get('seconds_per_edit_all', 0):.2f}",
                      *(f"{ph.get(k, 0):.0f}" for k in ("values", "keys", "solve", "write")), f"{measured:.0f}")
    out.print(table)
    out.print(precision.describe_machine(), highlight=False)
    line = amortised_line(label, points, settings)
    if line:
        out.print(line, highlight=False)


@bench_app.command("stats")
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

    cfg = _config(model, config)
    m, tok, name, _ = _load(model)
    layers = cfg.all_layers()
    out.print(precision.describe(cfg.method("alphaedit")).split(";")[0], highlight=False)
    with _progress() as bar:
        task = bar.add_task("covariance", total=tokens, rate="")
        r = bench.time_stats(m, tok, layers, cfg.stats, tokens, _roots().wikitext,
                             progress=lambda n: bar.advance(task, n))
    cov32 = r.pop("cov")
    if bf16:
        with _progress() as bar:
            task = bar.add_task("covariance (bf16 forward)", total=tokens, rate="")
            rb = bench.time_stats(m, tok, layers, cfg.stats, tokens, _roots().wikitext,
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


@bench_app.command("layer-sweep")
def bench_layer_sweep(
    model: ModelOpt = "smollm2-135m",
    layers: Annotated[str, typer.Option(help="comma-separated layers")] = "1,2,3,4,5,6,7,8,9,10,12,14",
    cases: int = 20,
    out_file: Annotated[Path, typer.Option("--out")] = Path("bench/layer_sweep.json"),
) -> None:
    """r-ROME (NAS off) at each layer alone: where do edits stick and generalise?"""
    from flows.studies import bench

    cfg = _config(model, None)
    ls = [int(x) for x in layers.split(",")]
    m, tok, name, h = _load(model)
    cov = _stats(m, tok, name, cfg, h, sorted(set(ls) | set(cfg.all_layers())))
    reqs = bench.counterfact_cases(_roots(), cases)
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


@bench_app.command("trace")
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
    cfg = _config(model, None)
    m, tok, name, _ = _load(model)
    width = band or len(cfg.alphaedit.layers)
    # Trace the facts the model knows best: a fact it barely predicts has no recall to locate.
    pool = bench.counterfact_cases(_roots(), 500)
    p_true = answer_probability(m, tok, pool)
    reqs = [pool[i] for i in p_true.argsort(descending=True)[:cases].tolist()]
    t0 = time.perf_counter()
    with _progress() as bar:
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



@bench_app.command("horizon")
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
) -> None:
    """The editing-horizon study (a Prefect flow): every method on the same edit stream, until collapse.

    Resumable: run the same command again to continue; a method added to --methods joins the study.
    Example: nas bench horizon --methods memit,memit+nas --stream-length 3000 --batch-size 10
    --eval-every 250 --eval-every-dense 100 --dense-until 1000 --compute-dtype auto
    """
    from flows.engine import precision
    from flows.refresh import prefect_runtime
    from flows.studies.horizon import HorizonSettings, horizon_study

    try:
        given = {"stream_length": stream_length, "batch_size": batch_size, "eval_every": eval_every,
                 "general_items": general_items, "canary_tokens": canary_tokens, "pilots": pilots,
                 "eval_every_dense": eval_every_dense, "dense_until": dense_until,
                 "retention_sample": retention_sample, "compute_dtype": compute_dtype}
        if methods is not None:
            given["methods"] = tuple(m.strip() for m in methods.split(",") if m.strip())
        settings = HorizonSettings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    prefect_runtime.claim_night()  # stops the temporary Prefect servers of killed runs; records this one
    t0 = time.perf_counter()
    res = horizon_study(model, settings, source, out_root, tracking_uri)
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
    out.print(table)
    out.print(precision.describe_machine(), highlight=False)
    out.print(f"wrote {res['results_path']} and {res['plot_path']} in {time.perf_counter() - t0:.0f} s")


ParamsOpt = Annotated[Path | None, typer.Option("--params", help="the pipeline's params.yaml (default: the project's)")]


def _params(path: Path):
    from flows.config.params import load_params

    try:
        return load_params(path)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--params") from None


def _tracker(params):
    from flows.tracking.mlflow import Tracker, TrackingError, resolve_tracking_uri

    try:
        return Tracker(resolve_tracking_uri(params.tracking.uri or None, params.root), params.tracking.experiment)
    except TrackingError as err:
        console.print(f"[yellow]MLflow unavailable ({err}); the ledger is updated, the alias is not[/]")
        return None


@app.command()
def refresh(
    params_file: ParamsOpt = None,
    demo: Annotated[bool, typer.Option("--demo", help="run the shipped demo nights, one flow run each")] = False,
) -> None:
    """Run the nightly refresh now (one Prefect flow run) over every batch in the inbox."""
    from flows.engine.checkpoints import CheckpointTampered
    from flows.ledger.records import LedgerDamaged
    from flows.refresh import operations, prefect_runtime
    from flows.refresh.flow import RefreshLocked, nightly_refresh

    params = _params(params_file)
    t0 = time.perf_counter()
    nights: list[Path | None] = [None]
    if demo:
        nights = list(operations.demo_nights(params))
        if not nights:
            out.print("every demo night is already in the ledger: nothing to do (see `nas status`)")
            return
    prefect_runtime.claim_night()  # stops the temporary Prefect servers of killed nights; records this one
    outcomes = []
    for night in nights:
        if night is not None:
            staged = operations.stage_demo_night(params, night)
            console.print(f"[bold]demo night {night.stem}[/]: {staged}")
        try:
            outcomes += nightly_refresh(str(params_file.resolve()) if params_file else None, str(params.root))
        except RefreshLocked as err:
            console.print(f"[red]{err}[/]")
            raise typer.Exit(3) from None
        except (CheckpointTampered, LedgerDamaged) as err:
            console.print(f"[red]refused: {err}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    table = Table("batch", "outcome", "details", title="nightly refresh")
    for o in outcomes:
        detail = o.get("version") or ", ".join(o.get("failed_checks", [])) or o.get("folder", "")
        table.add_row(str(o["batch"]), o["outcome"], str(detail))
    out.print(table)
    out.print(f"{len(outcomes)} batch(es) in {time.perf_counter() - t0:.0f} s; ledger {params.roots.ledger}")


def _problems_line(problems: dict[str, int] | None) -> str:
    """``12 problems: 8 gx:prompt_length, 2 ...`` from a rule -> count mapping."""
    if not problems:
        return ""
    total = sum(problems.values())
    return f"{total} problem{'s' if total != 1 else ''}: " + ", ".join(f"{n} {rule}" for rule, n in problems.items())


def _decision_details(e: dict) -> str:
    metrics = e.get("metrics") or {}
    if e.get("event") == "promote" and metrics:
        ratio = max((e.get("norm_ratios") or {"": 1.0}).values())
        return (f"editing score {metrics.get('retention.editing_score', float('nan')):.1f}, ppl ratio "
                f"{metrics.get('retention.perplexity_ratio', float('nan')):.3f}, norm ratio {ratio:.4f}")
    details = ", ".join(e.get("failed_checks") or []) or _problems_line(e.get("problems")) or e.get("reason") or ""
    return f"from {e['from_version']}: {details}" if e.get("from_version") else details


@app.command()
def status(
    params_file: ParamsOpt = None,
    verify: Annotated[bool, typer.Option("--verify", help="check every checkpoint file and accepted batch of "
                                         "the champion's lineage against the ledger (default: the champion only)")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """Champion version, edits so far, norm ratio, the last nights' verdicts; exit 1 on damage or tampering.

    Example: nas status --verify
    """
    from flows.refresh import operations

    s = operations.status(_params(params_file), verify=verify)
    bad = bool(s["ledger_damage"] or s["integrity"])
    if as_json:
        out.print_json(data=s, default=str)
        raise typer.Exit(1 if bad else 0)
    for line in s["ledger_damage"]:
        console.print(f"[red]ledger damage: {line}[/]", highlight=False, soft_wrap=True)
    for line in s["integrity"]:
        console.print(f"[red]integrity: {line}[/]", highlight=False, soft_wrap=True)
    champ = f"{s['champion']} (set by {s['champion_set_by']})" if s["champion"] else "the base model"
    checked = "lineage" if verify else "champion checkpoint"
    verdict = "not checked (the ledger is damaged)" if s["ledger_damage"] else \
        "FAILED its check" if s["integrity"] else "verified"
    out.print(f"champion: {champ}; {checked} {verdict}")
    if s["unhashed_versions"]:
        out.print("promoted before file hashes were recorded (weights hash checked only): "
                  + ", ".join(s["unhashed_versions"]))
    out.print(f"edits so far: {s['edits_so_far']}; max ||W||/||W0||: {s['norm_ratio_max']:.4f} "
              f"({s['norm_growth_per_edit']:.2e} per edit)")
    f = s.get("forecast") or {}
    if f.get("edits_left") is not None:
        nights = f" (about {f['nights_left']:.0f} nights at the lineage's rate)" if f.get("nights_left") else ""
        fits = ", ".join(f"{name} fit {'n/a' if f[key] is None else format(f[key], '.0f')}"
                         for name, key in (("linear", "edits_left_linear"), ("exponential", "edits_left_exponential")))
        out.print(f"forecast: the norm bound is reached in {f['edits_left']:.0f} more edits{nights}; {fits}")
    if s["weights_hash"]:
        out.print(f"weights hash: {s['weights_hash']}", soft_wrap=True)
    out.print(f"inbox: {', '.join(s['inbox']) or 'no batches'}")
    for item in s["inbox_ignored"]:
        out.print(f"  not a batch, left alone: {item['name']!r} ({item['why']})", highlight=False)
    table = Table("time", "event", "batch", "version", "details", title="recent decisions")
    for e in s["recent"]:
        table.add_row(str(e["time"]), e["event"], str(e.get("batch_id") or ""), str(e.get("version") or ""),
                      _decision_details(e))
    out.print(table)
    raise typer.Exit(1 if bad else 0)


@app.command("validate")
def validate_cmd(
    files: Annotated[list[Path], typer.Argument(help="fact batch files (.jsonl) to check")],
    params_file: ParamsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print every result as JSON")] = False,
) -> None:
    """Run exactly the night's checks (schema, GX suite, tokenizer, ledger conflicts against the
    champion) on batch files, editing and moving nothing. Exit 1 when a record or a batch would
    be refused, 0 otherwise (warnings included).

    Example: nas validate data/inbox/night-05.jsonl --json
    """
    from transformers import AutoTokenizer

    from flows.assets.models import fetch_model
    from flows.refresh.flow import champion_facts, check_batch

    params = _params(params_file)
    fetched = fetch_model(params.model_config().model, params.roots.models, show_progress=False)
    tok = AutoTokenizer.from_pretrained(fetched.path)
    facts = champion_facts(params)
    results = []
    for path in files:
        if not path.is_file():
            console.print(f"[red]{path}: not a file[/]")
            raise typer.Exit(2)
        results.append(check_batch(path, tok, facts, params))
    refused = any(not r.passed for r in results)
    if as_json:
        out.print_json(data=[r.to_dict() for r in results])
        raise typer.Exit(1 if refused else 0)
    for r in results:
        verdict = "would be accepted" if r.passed else "would be REFUSED"
        out.print(f"{r.path}: {verdict} ({r.n_records} records, sha256 {r.sha256[:12]})", highlight=False)
        table = Table("line", "case id", "rule", "severity", "message")
        for p in (*r.problems, *r.warnings):
            table.add_row(*(Text(x) for x in ("batch" if p.position < 0 else str(p.position + 1), p.case_id or "",
                                              p.rule, p.severity, p.message)))
        if r.problems or r.warnings:
            out.print(table)
        for rule, n in r.omitted.items():
            out.print(f"  and {n} more {rule} not listed")
    raise typer.Exit(1 if refused else 0)


def _move_champion(params_file: Path, version: str, event: str, reason: str) -> None:
    from flows.refresh import operations
    from flows.refresh.flow import RefreshLocked

    params = _params(params_file)
    try:
        entry = operations.move_champion(params, version, event, reason, _tracker(params))
    except (ValueError, FileNotFoundError, RefreshLocked) as err:  # CheckpointTampered, LedgerDamaged too
        console.print(f"[red]refused: {err}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"champion: {entry['from_version'] or 'base'} -> {version} ({event}, recorded in the ledger"
              f"{', MLflow alias moved' if entry.get('mlflow_model_version') else ''})")
    for problem in entry.get("audit_problems", []):
        console.print(f"[yellow]DVC audit record: {problem}[/]")


@app.command()
def rollback(
    version: Annotated[str, typer.Argument(help="an earlier promoted version, e.g. v0002")],
    reason: Annotated[str, typer.Option(help="why (recorded in the ledger)")] = "manual rollback",
    params_file: ParamsOpt = None,
) -> None:
    """Move the champion back to an earlier promoted checkpoint."""
    _move_champion(params_file, version, "rollback", reason)


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="a promoted version to make champion again, e.g. v0003")],
    reason: Annotated[str, typer.Option(help="why (recorded in the ledger)")] = "manual promotion",
    params_file: ParamsOpt = None,
) -> None:
    """Manual override: make a promoted checkpoint champion (e.g. roll forward after a rollback)."""
    _move_champion(params_file, version, "manual_promote", reason)


@app.command()
def audit(
    repro: Annotated[bool, typer.Option("--repro", help="first rebuild the champion: dvc repro --force "
                                        "--single-item replay, then dvc repro evaluate")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict as JSON")] = False,
    params_file: ParamsOpt = None,
) -> None:
    """Does the replayed champion (dvc repro) have the weights hash the ledger promoted? Exit 0 only if so."""
    import subprocess

    from flows.audit import audit as auditing
    from flows.ledger.records import Ledger, LedgerDamaged
    from flows.refresh import operations

    params = _params(params_file)
    try:
        ledger = Ledger(params.roots.ledger)
        champ = ledger.champion()
        # The audit rebuilds the weights (dvc repro), so absent checkpoints are fine; altered ones are not.
        tampered = operations.verify_lineage(params, ledger, champ.version, missing_ok=True) if champ else []
    except LedgerDamaged as err:
        tampered = [str(err)]
    if tampered:
        for line in tampered:
            console.print(f"[red]refused: {line}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if repro:
        try:
            auditing.repro(params.root)
        except subprocess.CalledProcessError as err:
            console.print(f"[red]dvc repro failed (exit {err.returncode}): see its output above[/]")
            raise typer.Exit(2) from None
    res = auditing.audit(params)
    if as_json:
        out.print_json(data={k: v for k, v in res.__dict__.items() if k != "replay"}, default=str)
    else:
        colour = "green" if res.ok else "red"
        out.print(f"[bold {colour}]{res.verdict}[/]")
        out.print(res.render(), markup=False, highlight=False, soft_wrap=True)  # hashes stay on one line
    raise typer.Exit(0 if res.ok else 1)


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="when to run, a 5-field cron expression")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="IANA timezone of the cron schedule")] = "UTC",
    name: Annotated[str, typer.Option(help="deployment name")] = "nightly",
    retries: Annotated[int, typer.Option(help="flow-run retries after a failure")] = 2,
    retry_delay: Annotated[int, typer.Option(help="seconds between retries")] = 600,
    params_file: ParamsOpt = None,
) -> None:
    """Register the nightly refresh as a scheduled deployment on a running Prefect server and serve it.

    Needs `prefect server start` and PREFECT_API_URL (README: "Scheduling"). No two runs overlap.
    """
    from flows.refresh.serve import ServeError
    from flows.refresh.serve import serve as serve_flow

    try:
        serve_flow(params_file, cron=cron, timezone=timezone, name=name, retries=retries,
                   retry_delay_seconds=retry_delay)
    except ServeError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
