"""The nightly pipeline's commands: ``refresh``, ``status``, ``validate``, ``rollback``, ``promote``,
``audit`` and ``serve``. Each reads the project's params.yaml (``--params``), renders what
flows.refresh and flows.audit decide, and turns refusals into exit codes (1: damage or a failed
check, 2: refused, 3: another refresh holds the lock).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from flows.cli.common import DeviceOpt, DtypeOpt, console, out, prefect_night, use_runtime
from flows.config.model import ConfigError

commands = typer.Typer()

ParamsOpt = Annotated[Path | None, typer.Option("--params", help="the pipeline's params.yaml (default: the project's)")]


def _params(path: Path):
    """The pipeline's params (``--params``, default: the project's); a bad file is a usage error."""
    from flows.config.params import load_params

    try:
        return load_params(path)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--params") from None


def _tracker(params):
    """The project's MLflow tracker, or None (with a warning) when the store is unavailable."""
    from flows.refresh.operations import open_tracker
    from flows.tracking.store import TrackingError

    try:
        return open_tracker(params)
    except TrackingError as err:
        console.print(f"[yellow]MLflow unavailable ({err}); the ledger is updated, the alias is not[/]")
        return None


@commands.command()
def refresh(
    params_file: ParamsOpt = None,
    demo: Annotated[bool, typer.Option("--demo", help="run the shipped demo nights, one flow run each")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcomes as JSON")] = False,
) -> None:
    """Run the nightly refresh now (one Prefect flow run) over every batch in the inbox.

    Example: nas refresh --demo   (the shipped demo nights; then `nas status`)
    """
    from flows.engine.checkpoints import CheckpointTampered
    from flows.ledger.records import LedgerDamaged
    from flows.refresh import operations
    from flows.refresh.lock import RefreshLocked

    use_runtime(device, dtype)  # before the params: they read it
    params = _params(params_file)
    t0 = time.perf_counter()
    nights = None
    if demo:
        nights = operations.demo_nights(params)
        if not nights:
            out.print("every demo night is already in the ledger: nothing to do (see `nas status`)")
            return
    try:
        with prefect_night():
            outcomes = operations.refresh_nights(params, params_file, nights, on_staged=lambda night, staged:
                                                 console.print(f"[bold]demo night {night.stem}[/]: {staged}"))
    except RefreshLocked as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(3) from None
    except (CheckpointTampered, LedgerDamaged) as err:
        console.print(f"[red]refused: {err}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    rows = _outcome_rows(params, outcomes)
    if as_json:
        out.print_json(data={"batches": rows, "seconds": round(time.perf_counter() - t0, 1),
                             "ledger": str(params.roots.ledger)}, default=str)
        return
    table = Table("batch", "outcome", "version", "details", title="nightly refresh")
    for r in rows:
        table.add_row(r["batch"], r["outcome"], r["version"] or "", r["details"])
    out.print(table)
    out.print(f"{len(outcomes)} batch(es) in {time.perf_counter() - t0:.0f} s; ledger {params.roots.ledger}")
    _print_next_steps(params, rows, demo)


def _outcome_rows(params, outcomes) -> list[dict]:
    """One row per batch: outcome, version and the ledger's details (scores, or why not)."""
    from flows.ledger.records import Ledger

    entries = Ledger(params.roots.ledger).entries()
    rows = []
    for o in outcomes:
        entry = next((e for e in reversed(entries) if e.get("batch_id") == o.batch), None)
        details = _decision_details(entry) if entry is not None and o.outcome != "already_applied" else ""
        rows.append({"batch": o.batch, "outcome": o.outcome, "version": o.version,
                     "details": details or ", ".join(o.failed_checks), "folder": o.folder})
    return rows


def _print_next_steps(params, rows: list[dict], demo: bool) -> None:
    """Where to look next; for the demo, also what its shortened settings are instead of."""
    from flows.tracking.uris import resolve_tracking_uri

    uri = resolve_tracking_uri(params.tracking.uri, params.root)
    out.print("next:", highlight=False)
    out.print("  nas status   the champion, its edits and norm ratio, the recent decisions", highlight=False)
    out.print(f"  mlflow ui --backend-store-uri {uri}   one run per batch, the registered model", highlight=False,
              soft_wrap=True)
    for r in rows:
        if r["folder"]:
            out.print(f"  {Path(r['folder']) / 'validation.html'}   why {r['batch']} was {r['outcome']}",
                      highlight=False, soft_wrap=True)
    if demo:
        out.print(_demo_settings_line(params), highlight=False)


def _demo_settings_line(params) -> str:
    """What the demo's shortened settings are, what this machine used, and what production uses."""
    from flows.config.model import config_for

    shipped = config_for(params.model, params.roots.configs)
    shipped_pilots = shipped.method(params.edit.method, params.edit.nas).nas.pilots
    pilots, tokens = params.method_settings().nas.pilots, params.model_config().stats.tokens
    roots = params.roots
    here = ""
    if not roots.pilot_source.is_file() and roots.fallback_pilots.is_file():
        facts = sum(1 for line in roots.fallback_pilots.read_text(encoding="utf-8").splitlines() if line.strip())
        here = f" ({min(pilots, facts)} here: the shipped pilot facts)"
    corpus = "" if roots.wikitext.is_file() else " of data/demo/corpus.txt (no WikiText-2 here)"
    return (f"demo-sized settings (params.yaml edit.pilots, edit.stats_tokens): {pilots} NAS pilots{here}, "
            f"covariance from {tokens:,} tokens{corpus}; production uses the model config's "
            f"{shipped_pilots} pilots and {shipped.stats.tokens:,} tokens (set both to 0)")


def _decision_details(e: dict) -> str:
    """The details column of ``nas status``'s recent decisions: scores for a promotion, else why."""
    from flows.facts.batch import problems_line

    metrics = e.get("metrics") or {}
    if e.get("event") == "promote" and metrics:
        ratio = max((e.get("norm_ratios") or {"": 1.0}).values())
        return (f"editing score {metrics.get('retention.editing_score', float('nan')):.1f}, ppl ratio "
                f"{metrics.get('retention.perplexity_ratio', float('nan')):.3f}, norm ratio {ratio:.4f}")
    details = ", ".join(e.get("failed_checks") or []) or problems_line(e.get("problems")) or e.get("reason") or ""
    return f"from {e['from_version']}: {details}" if e.get("from_version") else details


@commands.command()
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


@commands.command("validate")
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
    from flows.refresh.steps import NotABatchFile, check_files

    try:
        results = check_files(files, _params(params_file))
    except NotABatchFile as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
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
    """``rollback`` and ``promote``: move the champion in the ledger (and the MLflow alias), or exit 2."""
    from flows.refresh import operations
    from flows.refresh.lock import RefreshLocked

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


@commands.command()
def rollback(
    version: Annotated[str, typer.Argument(help="an earlier promoted version, e.g. v0002")],
    reason: Annotated[str, typer.Option(help="why (recorded in the ledger)")] = "manual rollback",
    params_file: ParamsOpt = None,
) -> None:
    """Move the champion back to an earlier promoted checkpoint.

    Example: nas rollback v0002
    """
    _move_champion(params_file, version, "rollback", reason)


@commands.command()
def promote(
    version: Annotated[str, typer.Argument(help="a promoted version to make champion again, e.g. v0003")],
    reason: Annotated[str, typer.Option(help="why (recorded in the ledger)")] = "manual promotion",
    params_file: ParamsOpt = None,
) -> None:
    """Manual override: make a promoted checkpoint champion (e.g. roll forward after a rollback).

    Example: nas promote v0003
    """
    _move_champion(params_file, version, "manual_promote", reason)


@commands.command()
def audit(
    repro: Annotated[bool, typer.Option("--repro", help="first rebuild the champion: dvc repro --force "
                                        "--single-item replay, then dvc repro evaluate")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict as JSON")] = False,
    params_file: ParamsOpt = None,
) -> None:
    """Is the champion `dvc repro` rebuilt the one the ledger promoted: bit for bit, within the
    params.yaml `audit` tolerances, or not (naming the first version and layer)? Exit 0 for the first two.

    Example: dvc repro && nas audit   (or: nas audit --repro)
    """
    import subprocess

    from flows.audit import verdict as auditing
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


@commands.command()
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

    Example: nas serve --cron "0 2 * * *" --timezone Europe/Berlin
    """
    from flows.refresh.serve import ServeError
    from flows.refresh.serve import serve as serve_flow

    try:
        serve_flow(params_file, cron=cron, timezone=timezone, name=name, retries=retries,
                   retry_delay_seconds=retry_delay)
    except ServeError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None



@commands.command()
def deploy(
    pool: Annotated[str, typer.Option(help="the Prefect work pool its runs go to (workers: prefect worker start "
                                           "--pool POOL)")] = "nas",
    name: Annotated[str, typer.Option(help="deployment name, one per model")] = "nightly",
    cron: Annotated[str, typer.Option(help="when to run, a 5-field cron expression")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="IANA timezone of the cron schedule")] = "UTC",
    create_pool: Annotated[bool, typer.Option(help="create the pool (type process) when it is missing")] = True,
    retries: Annotated[int, typer.Option(help="flow-run retries after a failure (on the worker)")] = 2,
    retry_delay: Annotated[int, typer.Option(help="seconds between retries")] = 600,
    params_file: ParamsOpt = None,
) -> None:
    """Register the nightly refresh as a scheduled deployment in a Prefect work pool, for workers on any machine.

    One deployment per model (params file); no two runs of one deployment overlap. docs/deploy.md has the topology.

    Example: nas deploy --pool gpu --name smollm2 --params params-smollm2.yaml --cron "0 2 * * *"
    """
    from flows.refresh.deploy import deploy as deploy_flow
    from flows.refresh.serve import ServeError, deployment_name

    try:
        deployment_id = deploy_flow(params_file, pool, name, cron=cron, timezone=timezone, create_pool=create_pool,
                                    retries=retries, retry_delay_seconds=retry_delay)
    except ServeError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
    console.print(f"deployed {deployment_name(name)} ({deployment_id}) to work pool {pool!r}, schedule {cron!r} "
                  f"{timezone}\nworkers: prefect worker start --pool {pool}\nrun now: prefect deployment run "
                  f"{deployment_name(name)}", markup=False, highlight=False)
