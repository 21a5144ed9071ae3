"""Stage ``anchor``: the NAS reference norm of the base model -> ``data/anchors/MODEL/``.

``python -m flows.stages.anchor [--params FILE]``. Calibrates with
:func:`flows.engine.loading.base_anchor` for params.yaml's method and pilot count, as the nightly
flow does. With NAS off (``edit.nas: false``) there is no anchor; the stage writes
``NAS-OFF`` in the folder so the output exists.
"""

from __future__ import annotations

import sys

from flows.engine.base import load_base
from flows.engine.loading import base_anchor
from flows.stages.common import log, parser, recorded_settings, setup_logging, stage_params


def main(argv: list[str] | None = None) -> int:

    params = stage_params(parser(__doc__.split("\n")[0]).parse_args(argv))
    setup_logging()
    base = load_base(params)
    if base_anchor(base, params, recorded_settings(params), log) is None:
        folder = params.roots.anchors / base.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "NAS-OFF").write_text("edit.nas is false: no anchor\n", encoding="utf-8")
        log.info("NAS is off: no anchor (wrote %s)", folder / "NAS-OFF")
    return 0


if __name__ == "__main__":
    sys.exit(main())
