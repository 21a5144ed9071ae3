"""The exported LoRA adapter against the materialised checkpoint, on the real model.

    nas export CKPT --format peft --out ADAPTER && python scripts/lora_parity.py CKPT ADAPTER [--model smollm2-135m]

Loads the base model twice: once with the checkpoint materialised (W + D), once with the adapter
through ``peft.PeftModel``; prints the largest relative logit difference over the checkpoint's
edit prompts, the adapter's size and each module's rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    from peft import PeftModel

    from flows.config.params import load_params
    from flows.engine.base import fetch_base
    from flows.engine.checkpoints import rebuild_verified
    from flows.engine.precision import describe_machine

    roots = load_params().roots
    edited, base = (fetch_base(args.model, roots.models, "cpu", "float32") for _ in range(2))
    rebuild_verified(edited.model, edited.base_hash, args.checkpoint)
    adapted = PeftModel.from_pretrained(base.model, str(args.adapter)).eval()
    report = json.loads((args.adapter / "nas_export.json").read_text(encoding="utf-8"))
    texts = ["The Eiffel Tower is located in the city of", "Tanzania is a country on the continent of",
             "The mother tongue of Danielle Darrieux is", "Toyota was founded in the country of"]
    worst = 0.0
    with torch.no_grad():
        for text in texts:
            ids = edited.tok(text, return_tensors="pt")
            want, got = edited.model(**ids).logits, adapted(**ids).logits
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    print(describe_machine())
    print(f"adapter {args.adapter}: {report['adapter_bytes'] / 1e6:.2f} MB, {report['edit_count']} edits, factors "
          f"from {report['source']}; ranks {sorted({m['rank'] for m in report['modules'].values()})}, "
          f"largest relative error of B A against D {max(m['relative_error'] for m in report['modules'].values()):.2e}")
    print(f"largest relative logit difference, adapter vs materialised checkpoint: {worst:.2e}")


if __name__ == "__main__":
    main()
