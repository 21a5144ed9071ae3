"""Stage ``fetch_model``: fetch params.yaml's model into ``data/models/MODEL`` (fp32 safetensors).

``python -m flows.stages.fetch_model [--params FILE]``. The model config's ``model`` source
(``configs/MODEL.yaml``) is fetched with :func:`flows.assets.fetch.fetch_model`, as the nightly flow
does; a second run finds it in place and returns at once.
"""

from __future__ import annotations

import sys

from flows.stages.common import log, parser, setup_logging, stage_params


def main(argv: list[str] | None = None) -> int:
    from flows.assets.fetch import fetch_model

    params = stage_params(parser(__doc__.split("\n")[0]).parse_args(argv))
    setup_logging()
    cfg = params.model_config()
    root = params.roots.models
    fetched = fetch_model(cfg.model, root, show_progress=False)
    expected = root / params.model
    if fetched.path.resolve() != expected.resolve():
        log.warning("the model landed in %s, but dvc.yaml tracks %s (data/models/${model})", fetched.path, expected)
    log.info("model %s %s (%s)", cfg.model, "already present" if fetched.already_present else "fetched",
             fetched.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
