"""The ``nas`` console script: the Typer app, its root options, and the command tree.

Each command module (``models``, ``editing``, ``night``, ``bench``, ``horizon``) declares its
commands on its own ``typer.Typer``; this module imports them and adds them without a name (typer's
"one file per command"), which lists them at the top level in this order. The command modules
import only :mod:`flows.cli.common`, never this module, so there is no import cycle and
``flows.cli.app:app`` has every command as soon as it is imported.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler

from flows.cli import bench, editing, horizon, models, night
from flows.cli.common import console
from flows.paths import ENV_PROJECT, project_root

app = typer.Typer(help="Continual knowledge editing with Norm-Anchor Scaling.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
app.add_typer(models.commands)  # fetch-model, stats, anchor
app.add_typer(editing.commands)  # edit, export, eval, demo
app.add_typer(night.commands)  # refresh, status, validate, rollback, promote, audit, serve, deploy
bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
bench_app.add_typer(bench.commands)  # efficacy, fall-of-rome, speed, stats, layer-sweep, trace
bench_app.add_typer(horizon.commands)  # horizon
app.add_typer(bench_app, name="bench")

ProjectOpt = Annotated[Path | None, typer.Option(
    "--project", help=f"project directory: params.yaml, data/, configs/ (default: ${ENV_PROJECT}, else the "
                      "working one)")]


def _print_version(value: bool) -> None:
    """``nas --version``: the installed package's version and the code's git commit."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from flows.io import code_version
        try:
            installed = version("nas-edit")
        except PackageNotFoundError:
            installed = "not installed"
        console.print(f"nas-edit {installed} (commit {code_version()})", highlight=False)
        raise typer.Exit()


#: Telemetry of the tools underneath is off unless the user turned it on (setdefault).
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False, project: ProjectOpt = None,
           _version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                  help="print the version and the git commit, then exit")] = False,
           _debug: Annotated[bool, typer.Option("--debug", help="show the full traceback of an error (read by main)")]
           = False,
           ) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    if project is not None:  # the one place the project is chosen; flows and child processes inherit it
        os.environ[ENV_PROJECT] = str(project_root(project))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # Dask sets its loggers' levels from its config when imported, workers too
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def main() -> None:
    """The ``nas`` console script: an error prints one line naming it (its first line: every
    message of the product says what was wrong and what to do) and exits 1; ``nas --debug ...``
    shows the traceback instead."""
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - the edge of the program: report, never swallow
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        console.print(f"error: {type(exc).__name__}: {first}", highlight=False, markup=False, soft_wrap=True)
        console.print("(run again as `nas --debug ...` for the traceback)", highlight=False, markup=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
