"""Write data/demo/corpus.txt: the covariance corpus for machines without ../shared/data.

Text SmolLM2-135M samples itself from its BOS token (``nas_core.stats.sample_self_text``, the
product's data-free calibration), made once and shipped as bytes, so every machine measures C
on the same text: sampling again on another CPU can change a token and, after it, the rest of
its sequence, so the auditor of a lineage could not rebuild its C.

    python scripts/make_fallback_corpus.py [--sequences 400] [--length 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import time

from flows.assets.load import load_model
from flows.paths import project_root
from nas_core.stats import sample_self_text

log = logging.getLogger("make_fallback_corpus")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sequences", type=int, default=400)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=40, help="sequences per generate call (one seed each)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = project_root()
    model, tok = load_model(root / "data" / "models" / "smollm2-135m")
    texts: list[str] = []
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, args.sequences, args.chunk)):
        n = min(args.chunk, args.sequences - start)
        texts += sample_self_text(model, tok, n, args.length, args.seed + i)
        log.info("%d/%d sequences in %.0f s", len(texts), args.sequences, time.perf_counter() - t0)
    out = root / "data" / "demo" / "corpus.txt"
    out.write_text("\n".join(t.replace("\n", " ").strip() for t in texts) + "\n", encoding="utf-8")
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)


if __name__ == "__main__":
    main()
