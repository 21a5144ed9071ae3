"""Stage ``evaluate``: score the replayed champion -> ``data/replay/metrics.json``, ``norms.csv``, ``retention.csv``.

``python -m flows.stages.evaluate [--params FILE] [--champion DIR] [--out-dir DIR]``.

Loads the base model, puts the replayed checkpoint on top and runs
:func:`flows.engine.evaluation.evaluate` with the nightly flow's arguments at promotion time: the
retention set the flow scored (the parent's facts not superseded by the last batch, then the
whole last batch), the weight-norm ratios against the base model, the edit count, params.yaml's
``eval`` and ``collapse`` settings; the edit metrics in params.yaml's ``scoring`` shards (on a Dask
cluster when it says so: the same numbers). On bit-identical weights the numbers equal the ledger's
``retention.*`` metrics of the champion, so ``dvc metrics diff`` against the promotion's
record shows no change.

Plot data: ``norms.csv`` (version, edits_so_far, layer, norm_ratio, source): the ledger's
ratios after every promotion of the lineage plus the replayed model's; ``retention.csv``: the
ledger's retention metrics per version plus the replayed model's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from flows.audit.outputs import (
    CHAMPION_DIR,
    METRICS_JSON,
    NORMS_CSV,
    NORMS_HEADER,
    REPLAY_DIR,
    RETENTION_CSV,
    RETENTION_HEADER,
    norms_rows,
    retention_rows,
)
from flows.engine.checkpoints import load_checkpoint_into
from flows.engine.shards import scorer_for
from flows.engine.workers import driver_base
from flows.io import write_csv, write_json
from flows.ledger.lineage import lineage_batches, retention_requests
from flows.stages.common import log, parser, recorded_settings, setup_logging, stage_params


def evaluate(params, champion: Path, out_dir: Path) -> dict:
    from flows.engine import evaluation
    from flows.ledger.records import Ledger
    from nas_core.collapse import norm_ratios
    from nas_core.deltas import frobenius_norms, weights_hash
    from nas_core.spec import spec_for

    t0 = time.perf_counter()
    cfg = params.model_config()
    ident, base = driver_base(cfg.model, params)
    names = [spec_for(base.model).weight_name(layer) for layer in recorded_settings(params).layers]
    original = frobenius_norms(base.model, names)
    base_ref = evaluation.base_reference(base.model, base.tok, base.name, base.base_hash, cfg.eval, params.roots)
    manifest = load_checkpoint_into(base.model, base.base_hash, champion)
    if weights_hash(base.model) != manifest["weights_hash"]:
        raise RuntimeError(f"{champion} rebuilt to other weights than its manifest records")
    version = manifest.get("version")
    edits = int(manifest.get("edit_count", 0))
    ledger = Ledger(params.roots.ledger)
    batches = lineage_batches(ledger, version, params.roots, params.edit.batch_size,
                              params.validation.schema_policy()) if version else []
    entries = [b.entry for b in batches]
    ratios = norm_ratios(frobenius_norms(base.model, names), original)
    requests = retention_requests(batches, params.validation.fold_confusables)
    doc: dict = {"source": "replay", "version": version, "weights_hash": manifest["weights_hash"], "edits": edits}
    current = None
    if requests:
        metrics, verdict = evaluation.evaluate(base.model, base.tok, requests, cfg.eval, base_ref, params.roots,
                                               ratios, edits, cfg.collapse,
                                               scorer=scorer_for(params.scoring, ident, names))
        current = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v is not None}
        doc.update(current)
        doc["verdict"] = verdict.summary()
        log.info("%s: %d requests, editing score %.1f, %s", version, len(requests),
                 current.get("editing_score", float("nan")), verdict.summary())
    else:
        doc["note"] = "no champion: the base model, nothing to score"
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out_dir / METRICS_JSON.name, doc)
    write_csv(out_dir / NORMS_CSV.name, NORMS_HEADER, norms_rows(entries, ratios if version else None, version, edits))
    write_csv(out_dir / RETENTION_CSV.name, RETENTION_HEADER, retention_rows(entries, current, version, edits))
    return doc


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--champion", type=Path, default=None, help=f"checkpoint folder (default {CHAMPION_DIR})")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where the three files go (default {REPLAY_DIR})")
    args = p.parse_args(argv)
    setup_logging()
    params = stage_params(args)
    evaluate(params, args.champion or params.root / CHAMPION_DIR, args.out_dir or params.root / REPLAY_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
