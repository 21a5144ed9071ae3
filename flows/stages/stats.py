"""Stage ``stats``: covariance statistics of every edited layer -> ``data/stats/MODEL/``.

``python -m flows.stages.stats [--params FILE]``. Runs :func:`flows.editing.ensure_stats`
over every layer the model config edits (any method) with params.yaml's token budget: the
same call, key and file the nightly flow uses, so the flow finds this file cached.
"""

from __future__ import annotations

import sys

from flows.stages.common import load_base, parser, setup_logging, stats_of


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.split("\n")[0]).parse_args(argv)
    setup_logging()
    base = load_base(args.params, args.repo)
    stats_of(base, require_cached=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
