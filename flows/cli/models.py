"""``nas fetch-model``, ``nas stats``, ``nas anchor``: the base model and what is measured on it once.

Statistics and the NAS anchor are cached per base weights hash; these commands fill the caches
that ``edit``, ``eval`` and the nightly refresh read.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import (
    AddressOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    ThreadsOpt,
    WorkersOpt,
    covariance_stats,
    fetch_and_load,
    method_settings,
    model_config,
    out,
    reference_norm,
    roots,
    runner_settings,
    use_runtime,
)

commands = typer.Typer()


@commands.command("fetch-model")
def fetch_model_cmd(
    name: Annotated[str, typer.Argument(help="smollm2-135m, gemma3-270m, hf:ORG/NAME[@REV], a folder or .gguf")],
    force: Annotated[bool, typer.Option(help="fetch again even when present")] = False,
) -> None:
    """Fetch a model and save it as an fp32 safetensors folder under data/models/.

    Example: nas fetch-model smollm2-135m
    """
    from flows.assets.fetch import fetch_model

    result = fetch_model(name, roots().models, force=force)
    out.print(f"{result.path} {'(already present, nothing to do)' if result.already_present else ''}")


@commands.command()
def stats(
    model: ModelOpt = "smollm2-135m",
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option(help="measure again even when cached (benchmarking)")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Covariance statistics C for every layer the model's config edits (cached).

    Example: nas stats --model smollm2-135m
    """
    use_runtime(device, dtype)
    cfg = model_config(model, config)
    m, tok, name, h = fetch_and_load(model)
    covariance_stats(m, tok, name, cfg, h, cfg.all_layers(), force=force)


@commands.command()
def anchor(
    model: ModelOpt = "smollm2-135m",
    method: Annotated[str, typer.Option(help="memit, alphaedit or rome")] = "alphaedit",
    pilots: Annotated[int | None, typer.Option(help="override the config's pilot count")] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    runner: Annotated[str | None, typer.Option(
        "--runner", help="where the pilot batches run: sequential, or dask (each batch a task on a Dask "
                         "cluster) [default: params.yaml anchor.runner]")] = None,
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Calibrate the NAS reference norm on the unedited model (cached, never on an edited one).

    Example: nas anchor --method alphaedit
    Example: nas anchor --pilots 1000 --runner dask --workers 2 --threads 1
    """
    use_runtime(device, dtype)
    cfg = model_config(model, config)
    s = method_settings(cfg, method, True, pilots)
    units = anchor_runner(runner, address, workers, threads)
    m, tok, name, h = fetch_and_load(model)
    reference_norm(m, tok, name, method, s, h, model, units)


def anchor_runner(runner: str | None, address: str | None, workers: int | None, threads: int | None):
    """``nas anchor``'s runner: params.yaml ``anchor.runner`` with the options given put over it
    (``--address`` and ``--workers`` each replace the other; neither carries to another kind);
    a bad mix is a usage error."""
    from flows.config.params import load_params

    configured = load_params().anchor.runner
    kind = runner or configured.kind
    carry = kind == configured.kind == "dask" and address is None and workers is None  # the configured cluster
    return runner_settings(kind, configured.address if carry else address, configured.workers if carry else workers,
                           threads if threads is not None else configured.threads)

