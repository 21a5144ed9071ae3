"""Convert every shared benchmark file into edit requests and report what failed.

Usage: ``python -m flows.stages.convert_report [DATA_DIR]``

``DATA_DIR`` defaults to params.yaml's ``paths.shared_data`` (``../shared/data``). For each file it prints
the totals (records, converted, failed) and the failures grouped by rule with a few examples.
Exit status: 0 when every file was read, 1 when a file is missing or unreadable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nas_core.formats import (
    ConversionReport,
    from_counterfact_easyedit,
    from_counterfact_rome,
    from_zsre_mend,
)

Converter = Callable[[Sequence[Any]], ConversionReport]

FILES: tuple[tuple[str, str, Converter], ...] = (
    ("counterfact/counterfact_500.json", "CounterFact, ROME layout", from_counterfact_rome),
    (
        "counterfact/counterfact-train.json",
        "CounterFact, EasyEdit layout",
        from_counterfact_easyedit,
    ),
    (
        "counterfact/counterfact-edit.json",
        "CounterFact, EasyEdit layout",
        from_counterfact_easyedit,
    ),
    ("counterfact/counterfact-val.json", "CounterFact, EasyEdit layout", from_counterfact_easyedit),
    ("zsre/zsre_mend_train-1k.json", "zsRE, MEND layout", from_zsre_mend),
)


def report_file(path: Path, convert: Converter, examples: int) -> ConversionReport:
    """Load one JSON file, convert it and print its totals and failures."""
    with path.open(encoding="utf-8") as handle:
        records = json.load(handle)
    report = convert(records)
    print(f"  total {report.n_total}, converted {len(report.requests)}, failed {report.n_failed}")
    for rule, problems in report.problems_by_rule().items():
        records_hit = len({p.position for p in problems})
        print(f"    {rule}: {len(problems)} problems in {records_hit} records")
        for problem in problems[:examples]:
            print(f"      {problem}")
        if len(problems) > examples:
            print(f"      ... and {len(problems) - examples} more")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(args) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    from flows.config.params import load_params

    data_dir = Path(args[0]) if args else load_params().roots.shared_data
    print(f"data: {data_dir}")
    status = 0
    totals = [0, 0, 0]
    for relative, layout, convert in FILES:
        path = data_dir / relative
        print(f"{relative} ({layout})")
        if not path.exists():
            print("  MISSING")
            status = 1
            continue
        try:
            report = report_file(path, convert, examples=3)
        except (OSError, ValueError) as exc:  # unreadable file or not JSON
            print(f"  UNREADABLE: {exc}")
            status = 1
            continue
        totals[0] += report.n_total
        totals[1] += len(report.requests)
        totals[2] += report.n_failed
    print(f"all files: total {totals[0]}, converted {totals[1]}, failed {totals[2]}")
    return status


if __name__ == "__main__":
    sys.exit(main())
