"""The 8B budget, measured on one Llama-3-8B-shaped MLP layer on this CPU (random weights, synthetic keys).

    python scripts/bench_8b_layer.py [--d-model 4096 --d-in 14336 --nights 30 --night-edits 24] [--out F]

Measures, for one down-projection (d_out = d_model, d_in = the MLP width), with the project's own
code: the covariance C's bytes, AlphaEdit's projector (eigendecomposition of C, then U0 U0^T:
``AlphaEditEditor.init_state``), the Woodbury update of one batch at 1 and 25 edits
(``AlphaEditEditor.replay``), the editor state rebuilt from a chain of ``--nights`` compact
versions, the bytes of one night's increment (``flows.engine.increments.pack`` written by
safetensors) and of a snapshot, and the process's peak memory. Then computes the five-layer
figures docs/scale.md tabulates. C is F F^T / m + a small diagonal with F (d_in, d_in / 7: 2048 at 8B): a spectrum
with a large head and a null-space tail, like a real layer's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.engine.increments import Step, pack  # noqa: E402
from flows.engine.precision import describe_machine  # noqa: E402
from nas_core.deltas import LowRankUpdate  # noqa: E402
from nas_core.editors.alphaedit import AlphaEditEditor  # noqa: E402
from nas_core.settings import AlphaEditSettings  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def synthetic_cov(d_in: int, head: int, gen: torch.Generator) -> torch.Tensor:
    f = torch.randn(d_in, head, generator=gen, dtype=torch.float32) * torch.linspace(3, 0.1, head)
    c = (f @ f.T).double() / head
    c.diagonal().add_(1e-4)
    return c


def night_step(d_model: int, d_in: int, n: int, gen: torch.Generator, a_inv_pk: torch.Tensor | None = None) -> Step:
    """A night's increment with the shapes and dtypes the editors write (left float32, right float64)."""
    left = torch.randn(d_model, n, generator=gen)
    right = a_inv_pk if a_inv_pk is not None else torch.randn(d_in, n, generator=gen, dtype=torch.float64)
    keys = torch.randn(d_in, n, generator=gen)
    return Step({"model.layers.0.mlp.down_proj.weight": LowRankUpdate(((left, right),), False)}, {0: keys}, n, 0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=14336)
    p.add_argument("--nights", type=int, default=30)
    p.add_argument("--night-edits", type=int, default=24)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "8b-layer.json")
    args = p.parse_args()
    d_model, d_in, gen = args.d_model, args.d_in, torch.Generator().manual_seed(0)
    res: dict = {"machine": describe_machine(), "d_model": d_model, "d_in": d_in, "threads": torch.get_num_threads()}
    print(res["machine"], f"| d_model {d_model}, d_in {d_in}, {torch.get_num_threads()} threads", flush=True)

    cov, res["cov_build_s"] = timed(lambda: synthetic_cov(d_in, max(8, d_in // 7), gen))
    res["cov_bytes_float64"] = cov.numel() * 8
    editor = AlphaEditEditor(AlphaEditSettings(layers=(0,), nullspace_threshold=1e-2), {0: cov})
    state, res["projector_s"] = timed(lambda: editor.init_state(None))  # eigh(C) + U0 U0^T
    res["nullspace_dim"] = round(float(torch.trace(state.projectors[0])))
    print(f"projector: {res['projector_s']:.1f} s (null space {res['nullspace_dim']} of {d_in})", flush=True)
    del cov, editor.cov[0]

    for n in (1, 25):
        keys = torch.randn(d_in, n, generator=gen)
        _, res[f"woodbury_batch{n}_s"] = timed(lambda keys=keys, n=n: editor.replay(state, {0: keys}, n, 0))
        print(f"Woodbury update, batch {n}: {res[f'woodbury_batch{n}_s']:.2f} s", flush=True)

    steps = [night_step(d_model, d_in, args.night_edits, gen) for _ in range(args.nights)]
    t0 = time.perf_counter()
    rebuilt = state
    for step in steps:
        rebuilt = editor.replay(rebuilt, step.keys, step.edited, step.skipped)
        dense = step.updates()  # D's share of the night, as a load rebuilds it
    res["rebuild_chain_s"] = time.perf_counter() - t0
    res["rebuild_per_night_s"] = res["rebuild_chain_s"] / args.nights
    print(f"state + D rebuilt from {args.nights} versions: {res['rebuild_chain_s']:.1f} s", flush=True)
    del dense

    with tempfile.TemporaryDirectory() as tmp:
        tensors, _ = pack([steps[0]])
        save_file(tensors, Path(tmp) / "increment.safetensors")
        res["night_increment_bytes"] = (Path(tmp) / "increment.safetensors").stat().st_size
        sd = rebuilt.state_dict(projectors=False)
        save_file(sd, Path(tmp) / "state.safetensors")
        res["snapshot_state_bytes"] = (Path(tmp) / "state.safetensors").stat().st_size
    res["snapshot_deltas_bytes"] = d_model * d_in * 4
    tensors = (*rebuilt.projectors.values(), *rebuilt.inverses.values())
    res["state_ram_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    res["peak_rss_gb"] = peak_rss_gb()
    L = args.layers
    res["five_layers"] = {
        "night_bytes": L * res["night_increment_bytes"],
        "snapshot_bytes": L * (res["snapshot_state_bytes"] + res["snapshot_deltas_bytes"]),
        "state_ram_bytes": L * res["state_ram_bytes"],
        "projector_s": L * res["projector_s"],
        "rebuild_per_night_s": L * res["rebuild_per_night_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
