"""``nas edit``, ``nas export``, ``nas eval``, ``nas demo``: edit a model by hand, outside the night.

The request reader takes every layout the product converts (fact-batch JSONL, CounterFact in the
ROME or EasyEdit layout, zsRE) and reports the records it could not convert.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.common import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    console,
    covariance_stats,
    fetch_and_load,
    method_settings,
    model_config,
    out,
    progress_bar,
    reference_norm,
    roots,
    use_runtime,
)
from flows.engine import editing
from flows.engine.checkpoint_format import verify_checkpoint
from flows.engine.checkpoints import rebuild_verified, write_checkpoint
from nas_core.requests import EditRequest

commands = typer.Typer()


def read_requests(path: Path, limit: int | None = None) -> list[EditRequest]:
    """Requests from a fact-batch JSONL, or a CounterFact (ROME/EasyEdit) or zsRE JSON file."""
    from nas_core import formats as rq

    text = path.read_text(encoding="utf-8")
    report = rq.parse_fact_jsonl(text) if path.suffix == ".jsonl" else rq.from_any_layout(json.loads(text))
    if report.problems:
        console.print(f"[yellow]{path}: {report.n_failed} record(s) could not be converted:[/]\n"
                      f"{report.summary()}")
    reqs = list(report.requests)
    return reqs[:limit] if limit else reqs


@commands.command()
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
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Apply requests in sequential batches and write a checkpoint (its increment and manifest).

    Example: nas edit -r data/demo/batches/night-01.jsonl -o runs/night-01 --method alphaedit --nas
    """
    use_runtime(device, dtype)
    cfg = model_config(model, config)
    s = method_settings(cfg, method, nas, pilots)
    reqs = read_requests(requests, limit)
    if not reqs:
        raise typer.BadParameter(f"{requests}: no usable requests")
    m, tok, name, h = fetch_and_load(model)
    cov = covariance_stats(m, tok, name, cfg, h, cfg.all_layers())
    a = reference_norm(m, tok, name, method, s, h, model)
    session = editing.open_session(m, tok, name, method, s, cov, h, a, from_dir)
    t0 = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"{method}{'+nas' if nas else ''}", total=len(reqs), rate="")
        done = editing.apply_in_batches(session, reqs, batch_size, progress=lambda n, _total: bar.update(
            task, completed=n, rate=f"{(time.perf_counter() - t0) / n:.2f} s/edit"))
    write_checkpoint(session, out_dir, {"requests_file": str(requests)})
    skipped = sum(r["skipped"] for r in done)
    out.print(f"wrote {out_dir}: {len(reqs) - skipped} edits, {skipped} skipped by NAS, "
              f"{time.perf_counter() - t0:.1f} s")


@commands.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o")],
    model: ModelOpt = "smollm2-135m",
    fmt: Annotated[str, typer.Option("--format", help="hf: a full model folder; peft: a LoRA adapter of the "
                                                      "edits")] = "hf",
    max_rank: Annotated[int | None, typer.Option(help="peft: truncate each module to this rank (SVD)")] = None,
) -> None:
    """Write a checkpoint as a full Hugging Face model folder (base + deltas) or a PEFT LoRA adapter.

    Example: nas export data/checkpoints/v0003 -o exported/v0003 --format peft
    """
    if fmt == "peft":
        _export_peft(checkpoint, out_dir, model, max_rank)
        return
    if fmt != "hf":
        raise typer.BadParameter(f"--format must be hf or peft, not {fmt!r}", param_hint="--format")
    try:
        verify_checkpoint(checkpoint, chain=False)  # a wrong folder fails before the model is loaded;
        # rebuild_verified below checks the whole chain
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    m, tok, name, h = fetch_and_load(model)
    try:
        got = rebuild_verified(m, h, checkpoint)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    m.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    out.print(f"exported {out_dir} (weights hash {got[:16]})")


def _export_peft(checkpoint: Path, out_dir: Path, model: str, max_rank: int | None) -> None:
    """The adapter, without loading the model: its folder names the base, its config the layout."""
    from flows.assets.fetch import fetch_model
    from flows.engine.lora_export import export_peft
    from nas_core.spec import spec_for_model_type

    folder = fetch_model(model, roots().models).path
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8"))["model_type"]
    try:
        report = export_peft(checkpoint, out_dir, str(folder), spec_for_model_type(model_type).transposed, max_rank)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    table = Table("module", "rank", "exact", "relative error")
    for name, m in report["modules"].items():
        table.add_row(name, str(m["rank"]), "yes" if m["exact"] else "no (SVD)", f"{m['relative_error']:.2e}")
    out.print(table)
    source = "the nights' own factors" if report["source"] == "factors" else "the SVD of D"
    out.print(f"exported {out_dir}: a PEFT LoRA adapter of {report['edit_count']} edits "
              f"({report['adapter_bytes'] / 1e6:.2f} MB, from {source}); load it with "
              f"peft.PeftModel.from_pretrained(base, {str(out_dir)!r})")


@commands.command("eval")
def eval_cmd(
    requests: Annotated[Path, typer.Option("--requests", "-r", exists=True, dir_okay=False)],
    model: ModelOpt = "smollm2-135m",
    checkpoint: Annotated[Path | None, typer.Option(exists=True, file_okay=False,
                                                   help="checkpoint to evaluate (default: the base model)")] = None,
    limit: Annotated[int | None, typer.Option(help="first N requests only")] = None,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="where to write metrics.json")] = Path("metrics.json"),
    no_health: Annotated[bool, typer.Option("--no-health", help="skip canary perplexity and general tasks")] = False,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Edit metrics, model health and the collapse verdict of a checkpoint (or the base model).

    Example: nas eval -r data/demo/batches/night-01.jsonl --checkpoint data/checkpoints/v0001
    """
    from flows.engine import evaluation

    use_runtime(device, dtype)
    cfg = model_config(model, config)
    reqs = read_requests(requests, limit)
    m, tok, name, h = fetch_and_load(model)
    base = None if no_health else evaluation.base_reference(m, tok, name, h, cfg.eval, roots())
    try:
        applied = evaluation.apply_checkpoint(m, h, checkpoint)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    t0 = time.perf_counter()
    metrics, verdict = evaluation.evaluate(m, tok, reqs, cfg.eval, base, roots(), applied.norm_ratios, applied.edits,
                                           cfg.collapse, health=not no_health)
    evaluation.write_metrics(out_file, metrics, verdict,
                             evaluation.eval_context(name, h, applied, requests, time.perf_counter() - t0))
    table = Table("metric", "value", "base", title=f"{name}{f' @ {checkpoint}' if checkpoint else ' (base)'}")
    base_metrics = base["metrics"] if base else {}
    for key, value in metrics.items():
        ref = base_metrics.get(key)
        table.add_row(key, "-" if value is None else f"{value:.4g}", "" if ref is None else f"{ref:.4g}")
    out.print(table)
    out.print(f"verdict: {verdict.summary()}\nwrote {out_file}")


@commands.command()
def demo(
    model: ModelOpt = "smollm2-135m",
    pilots: Annotated[int, typer.Option(help="NAS pilots (the demo uses fewer than the default 1000)")] = 20,
    stats_tokens: Annotated[int, typer.Option(help="corpus tokens for C (the config's default is 250k)")] = 100_000,
) -> None:
    """One edit on the real model: fetch it, write one fact with AlphaEdit+NAS, show before/after.

    To be quick on a CPU the demo measures C on 100k tokens and calibrates NAS on 20 pilots;
    `nas stats` / `nas anchor` compute the full-size versions.

    Example: nas demo
    """
    from flows.studies import demo as study

    cfg = study.demo_config(model_config(model, None), stats_tokens)
    s = method_settings(cfg, study.METHOD, True, pilots)
    m, tok, name, h = fetch_and_load(model)
    cov = covariance_stats(m, tok, name, cfg, h, cfg.all_layers())
    a = reference_norm(m, tok, name, study.METHOD, s, h, model)
    res = study.run_demo(editing.open_session(m, tok, name, study.METHOD, s, cov, h, a))
    req = res.request
    table = Table(title=f"AlphaEdit+NAS on {name}: '{req.subject}' -> '{req.target_new}' ({res.seconds:.1f} s)")
    table.add_column("prompt")
    table.add_column("before")
    table.add_column("after")
    for p in res.before:
        table.add_row(p, repr(res.before[p]), repr(res.after[p]))
    out.print(table)
    d = res.edit
    out.print(f"||v*|| {d.v_norm_before:.2f} -> {d.v_norm_after:.2f} (anchor a = {a:.2f}); "
              f"target NLL {d.nll_start:.2f} -> {d.nll_end:.2f}")
