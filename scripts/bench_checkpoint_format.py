"""Checkpoint format, old against new, on the real model: the demo nights' lineage edited by two trees.

    python scripts/bench_checkpoint_format.py --old-tree /tmp/nas-old [--nights 3] [--out bench/ckpt-format.json]

Both trees run the same worker (this file, ``--worker``) in their own process: params.yaml as
shipped (AlphaEdit + NAS, sub-batches of 8, the project's cached statistics and anchor), each
promoted demo night (night-01, night-02, night-04: 24 facts each) edited on a session opened
from the previous night's checkpoint, like the nightly flow. Printed per version: the weights
hash (must be equal in both trees), bytes on disk, seconds to load the champion and to write.
The old tree is a ``git worktree`` of a commit before the compact format.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NIGHTS = ("night-01", "night-02", "night-04")


def worker(project: Path, params_file: Path, out: Path, nights: int) -> dict:
    from flows.config.params import load_params
    from flows.engine import editing
    from flows.engine.base import load_base
    from flows.engine.checkpoints import write_checkpoint
    from flows.engine.loading import base_anchor, base_stats
    from nas_core.deltas import materialise, weights_hash
    from nas_core.formats.facts import parse_fact_jsonl

    params = load_params(params_file, project=project)
    base = load_base(params)
    settings = params.method_settings()
    cov = base_stats(base, params, require_cached=True)
    anchor = base_anchor(base, params, settings, require_cached=True)
    rows, champion, base_weights = [], None, None
    for i, night in enumerate(NIGHTS[:nights], 1):
        reqs = list(parse_fact_jsonl((project / "data/demo/batches" / f"{night}.jsonl").read_text()).requests)
        if base_weights is not None:
            materialise(base.model, base_weights, {})  # the base model again, as a new night loads it
        t0 = time.perf_counter()
        session = editing.open_session(base.model, base.tok, base.name, params.edit.method, settings, cov,
                                       base.base_hash, anchor, champion)
        load_s = time.perf_counter() - t0
        base_weights = session.base
        t0 = time.perf_counter()
        editing.apply_in_batches(session, reqs, params.edit.batch_size)
        edit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        champion = write_checkpoint(session, out / f"v{i:04d}")
        write_s = time.perf_counter() - t0
        files = {p.name: p.stat().st_size for p in sorted(champion.iterdir())}
        rows.append({"version": champion.name, "night": night, "edits": session.state.edit_count,
                     "weights_hash": weights_hash(session.model), "bytes": sum(files.values()), "files": files,
                     "load_s": round(load_s, 2), "edit_s": round(edit_s, 1), "write_s": round(write_s, 2)})
    materialise(base.model, base_weights, {})
    t0 = time.perf_counter()
    final = editing.open_session(base.model, base.tok, base.name, params.edit.method, settings, cov,
                                 base.base_hash, anchor, champion)
    return {"rows": rows, "load_champion_s": round(time.perf_counter() - t0, 2),
            "reload_hash_ok": weights_hash(final.model) == rows[-1]["weights_hash"]}


def run_tree(tree: Path, out: Path, nights: int) -> dict:
    """The worker in ``tree``'s code, on this project's data, with params.yaml less the keys that
    tree does not know (the old tree has no ``checkpoints`` or ``runtime`` section); the editing
    settings are the same."""
    import yaml

    doc = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    if not (tree / "flows/engine/increments.py").is_file():  # sections added with the compact format
        doc.pop("checkpoints", None)
        doc.pop("runtime", None)
        doc.get("collapse", {}).pop("norm_ratio_by_method", None)
    out.mkdir(parents=True)
    params_file = out / "params.yaml"
    params_file.write_text(yaml.safe_dump(doc), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, __file__, "--worker", "--project", str(REPO), "--params", str(params_file),
                          "--ckpt", str(out / "checkpoints"), "--nights", str(nights)], cwd=tree, env=env,
                         capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"worker in {tree} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                          check=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--project", type=Path, default=REPO)
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--params", type=Path)
    p.add_argument("--old-tree", type=Path)
    p.add_argument("--nights", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "ckpt-format.json")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.project, args.params, args.ckpt, args.nights)))
        return
    sys.path.insert(0, str(REPO))
    import tempfile

    from flows.audit.machine import machine_info
    from flows.engine.precision import describe_machine

    with tempfile.TemporaryDirectory() as tmp:
        old = run_tree(args.old_tree, Path(tmp) / "old", args.nights)
        new = run_tree(REPO, Path(tmp) / "new", args.nights)
    doc = {"machine": machine_info(), "machine_line": describe_machine(),
           "old_commit": commit_of(args.old_tree), "new_commit": commit_of(REPO),
           "old": old, "new": new,
           "same_hashes": [a["weights_hash"] == b["weights_hash"]
                           for a, b in zip(old["rows"], new["rows"], strict=True)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"{doc['machine_line']} | old {doc['old_commit']} vs new {doc['new_commit']}")
    print(f"{'version':8} {'edits':>5} {'old MB':>8} {'new MB':>8} {'old load s':>10} {'new load s':>10}  same")
    for a, b, same in zip(old["rows"], new["rows"], doc["same_hashes"], strict=True):
        print(f"{a['version']:8} {a['edits']:5d} {a['bytes'] / 1e6:8.2f} {b['bytes'] / 1e6:8.2f} {a['load_s']:10.2f} "
              f"{b['load_s']:10.2f}  {same} {b['weights_hash'][:12]}")
    print(f"load the champion: old {old['load_champion_s']} s, new {new['load_champion_s']} s; "
          f"reloaded hash ok: old {old['reload_hash_ok']}, new {new['reload_hash_ok']}")


if __name__ == "__main__":
    main()
