"""Stage ``stats``: covariance statistics of every edited layer -> ``data/stats/MODEL/``.

``python -m flows.stages.stats [--params FILE]``. Runs :func:`flows.engine.base_stats`, the
nightly flow's own call: every layer the model config edits (any method) with params.yaml's
token budget, under the key the flow looks up, so the flow finds this file cached.
"""

from __future__ import annotations

import sys

from flows.engine.base import load_base
from flows.engine.loading import base_stats
from flows.stages.common import log, parser, setup_logging, stage_params


def main(argv: list[str] | None = None) -> int:

    params = stage_params(parser(__doc__.split("\n")[0]).parse_args(argv))
    setup_logging()
    base_stats(load_base(params), params, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
