"""Do two horizon study folders hold the same results? Per method: the checkpoint's weights hash,
its files' hashes and every point's metrics (times, dates and processes aside). Exit 1 if not.

    python scripts/same_results.py bench/dask-measure/seq/smollm2-135m-* bench/dask-measure/dask/smollm2-135m-*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def method_record(study: Path, method: str) -> dict:
    """What must be equal between two runs of one method."""
    man = json.loads((study / method / "checkpoint" / "manifest.json").read_text(encoding="utf-8"))
    return {"weights_hash": man["weights_hash"], "files": man["files"],
            "points": [(p["edits"], p["metrics"], p["threads"]) for p in man["horizon_points"]]}


def main(a: Path, b: Path) -> int:
    ra, rb = (json.loads((s / "results.json").read_text(encoding="utf-8")) for s in (a, b))
    same = True
    for method in ra["methods"]:
        x, y = method_record(a, method), method_record(b, method)
        equal = x == y
        same &= equal
        metrics = len(x["points"][-1][1])
        print(f"{method:14s} weights {x['weights_hash'][:12]} / {y['weights_hash'][:12]}  "
              f"{len(x['points'])} points x {metrics} metrics  {'identical' if equal else 'DIFFERENT'}")
    for label, r in (("A", ra), ("B", rb)):
        print(f"{label}: runner {r.get('runner')}, base {r['base_weights_hash'][:12]}")
    return 0 if same and ra["methods"].keys() == rb["methods"].keys() else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
