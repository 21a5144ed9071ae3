"""Stage ``replay``: rebuild the ledger's champion from the base model -> ``data/replay/champion/``.

``python -m flows.stages.replay [--params FILE] [--out DIR] [--metrics FILE]``.

The edits go through the nightly flow's own functions: :func:`flows.engine.base.load_base`, the
statistics and anchor the ``stats`` and ``anchor`` stages made (``base_stats`` /
``base_anchor``, found cached under the keys the flow uses), ``open_session``, then for every
promote entry of the champion's lineage, oldest first, :func:`flows.engine.editing.apply_in_batches`
(the night's ``edit`` step) over the batch's requests.
Those requests are the accepted batch file's records in file order (the flow's
``validation.requests``: an accepted batch has no invalid record), *including* the ones NAS
skipped (a skipped request was part of the apply call and moved nothing). A rejected batch
left no trace (the flow restored the champion), so it is not replayed.

Before editing, every batch is checked against the ledger (file sha256; records minus
``skipped_ids`` equal ``request_ids`` in order); after each batch the weights hash is
compared with the one the ledger recorded for that version, so a divergence is pinned to
its first version. Writes the checkpoint to ``--out`` and ``replay.json`` with
``weights_hash``, ``ledger_champion``, ``ledger_weights_hash``, ``match``, ``edits``,
``seconds``, the per-version hashes and :func:`flows.audit.machine.machine_info`. Exit status 0 even
on a mismatch: the verdict is ``flows.audit.verdict``'s (and a mismatch must still be recorded).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from flows.audit.machine import machine_info
from flows.audit.outputs import CHAMPION_DIR, REPLAY_JSON
from flows.engine import precision
from flows.engine.base import load_base
from flows.engine.checkpoints import write_checkpoint
from flows.engine.loading import base_anchor, base_stats, night_inputs
from flows.io import write_json
from flows.ledger.lineage import champion_of, lineage_batches
from flows.stages.common import log, parser, recorded_settings, setup_logging, stage_params


def replay(params, out: Path, metrics: Path, require_cached: bool = True) -> dict[str, Any]:
    """Rebuild the champion into ``out`` and write ``metrics`` (replay.json); returns its content."""
    from flows.engine import editing
    from flows.ledger.records import Ledger
    from nas_core.deltas import weights_hash

    t0 = time.perf_counter()
    base = load_base(params)
    settings = recorded_settings(params)
    cov = base_stats(base, params, log, require_cached)
    anchor = base_anchor(base, params, settings, log, require_cached)
    ledger = Ledger(params.roots.ledger)
    version, expected = champion_of(ledger)
    batches = lineage_batches(ledger, version, params.roots, params.edit.batch_size, params.validation.schema_policy())
    inputs = night_inputs(cov, anchor)
    log.info("replaying %s: %d accepted batch(es), %d requests, %s%s, batch size %s",
             version or "no champion (the base model)", len(batches), sum(len(b.requests) for b in batches),
             params.edit.method, "+NAS" if params.edit.nas else "", params.edit.batch_size)
    session = editing.open_session(base.model, base.tok, base.name, params.edit.method, settings, cov,
                                   base.base_hash, anchor, None)
    versions = [_replay_batch(session, b, inputs) for b in batches]
    write_checkpoint(session, out, {"version": version, "replay": True, "ledger_weights_hash": expected})
    rebuilt = weights_hash(session.model)
    doc = {
        "source": "replay",
        "weights_hash": rebuilt,
        "ledger_champion": version,
        "ledger_weights_hash": expected,
        "match": expected is None or rebuilt == expected,
        "edits": session.state.edit_count,
        "seconds": round(time.perf_counter() - t0, 1),
        "base_weights_hash": base.base_hash,
        "model": base.name,
        "method": params.edit.method,
        "nas": params.edit.nas,
        "batch_size": params.edit.batch_size,
        "machine": machine_info(base.model),
        "inputs": inputs,
        "versions": versions,
    }
    write_json(metrics, doc)
    log.info("replayed champion %s: weights %s, ledger %s: %s", version, rebuilt[:12], (expected or "-")[:12],
             "MATCH" if doc["match"] else "MISMATCH")
    return doc


def _replay_batch(session, b, inputs: dict[str, Any]) -> dict[str, Any]:
    """One lineage batch through the night's own loop, on the precision path the night took
    (float32 for nights before the setting existed), never this machine's own choice."""
    from flows.engine import editing
    from nas_core.deltas import weights_hash

    session.use_path(*precision.recorded_path(b.entry))
    t1 = time.perf_counter()
    diagnostics = editing.apply_in_batches(session, list(b.requests), b.batch_size, log, b.version)
    applied = [d["case_id"] for d in diagnostics if not d["skipped"]]
    skipped = [d["case_id"] for d in diagnostics if d["skipped"]]
    rebuilt = weights_hash(session.model)
    row = {"version": b.version, "batch_id": b.batch_id, "requests": len(b.requests), "batch_size": b.batch_size,
           "weights_hash": rebuilt, "ledger_weights_hash": b.weights_hash, "match": rebuilt == b.weights_hash,
           "same_skips": applied == list(b.request_ids) and skipped == list(b.skipped_ids),
           "edits": session.state.edit_count, "ledger_edits": b.edits_so_far,
           "seconds": round(time.perf_counter() - t1, 1), **_fingerprint_row(session, b.entry),
           "inputs_divergence": _inputs_divergence(b.entry.get("inputs"), inputs)}
    log.info("%s (%s): %d requests, %d edits so far, weights %s %s the ledger's %s", b.version, b.batch_id,
             len(b.requests), session.state.edit_count, rebuilt[:12], "==" if row["match"] else "!=",
             b.weights_hash[:12])
    if not row["same_skips"]:
        log.warning("%s: NAS skipped %s on replay, the ledger recorded %s", b.version, skipped, list(b.skipped_ids))
    return row


def _fingerprint_row(session, entry: dict[str, Any]) -> dict[str, Any]:
    """This version's update fingerprints and, where the ledger recorded them, the divergence of
    each layer (largest first) from the night's."""
    from nas_core.fingerprint import divergences, fingerprints

    mine = fingerprints(session.cumulative)
    recorded = entry.get("fingerprints")
    if not recorded:
        return {"fingerprints": mine, "divergence": None}
    return {"fingerprints": mine, "divergence": {d.name: d.relative for d in divergences(recorded, mine)}}


def _inputs_divergence(recorded: dict[str, Any] | None, mine: dict[str, Any]) -> dict[str, float] | None:
    """Relative difference of the anchor and of each layer's covariance trace from the ones the
    night recorded (None: not recorded)."""
    if not recorded:
        return None

    def rel(a: float | None, b: float | None) -> float:
        if a is None or b is None:
            return 0.0 if a is None and b is None else float("inf")
        return abs(a - b) / abs(a) if a else (0.0 if a == b else float("inf"))

    out = {"anchor": rel(recorded.get("anchor"), mine.get("anchor"))}
    theirs, ours = recorded.get("covariance_trace", {}), mine.get("covariance_trace", {})
    for layer in sorted(set(theirs) | set(ours), key=int):
        out[f"covariance_trace.{layer}"] = rel(theirs.get(layer), ours.get(layer))
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help=f"checkpoint folder (default {CHAMPION_DIR})")
    p.add_argument("--metrics", type=Path, default=None, help=f"replay.json (default {REPLAY_JSON})")
    args = p.parse_args(argv)
    setup_logging()
    params = stage_params(args)
    replay(params, args.out or params.root / CHAMPION_DIR, args.metrics or params.root / REPLAY_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
