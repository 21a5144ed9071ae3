"""The prepared GPU check: one command, at most 8 minutes on one H100/H200, torch and transformers only.

    python scripts/gpu_check.py [--device cuda] [--scale 8b|tiny]
                                [--smollm DIR --corpus TXT --stream JSON --horizon-edits 2000] [--out F]

(a) A random-initialised model with Llama-3-8B's shapes (a transformers ``LlamaConfig``, bf16 on
    a GPU, nothing downloaded), edited with configs/llama3-8b.yaml's AlphaEdit+NAS settings:
    statistics throughput, the projector (eigendecomposition on the device), the NAS anchor,
    seconds per edit at batch 1 and 25, peak device memory, and a 24-edit night's increment
    bytes (the compact checkpoint). The random model's covariance has no meaningful absolute
    scale, so the null-space cut is the relative one (1e-2 of lambda_max).
(b) With ``--smollm`` (a local SmolLM2 folder), ``--corpus`` (text for C) and ``--stream``
    (CounterFact JSON): one edit on the CPU and on the device, compared; then AlphaEdit and
    AlphaEdit+NAS over ``--horizon-edits`` edits at batch 25, measured every 250 edits on a fixed
    sample of 200 edits, with each method's collapse point (editing score < 60 or canary
    perplexity above 2x the base's, the horizon study's CP@60).

``--scale tiny --device cpu`` runs the same code on a scaled-down config in seconds (the test
suite does). Phases past ``--budget-s`` are skipped and say so. One table at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from safetensors.torch import save  # noqa: E402  (a transformers dependency)

from flows.config.model import config_for  # noqa: E402  (yaml + nas_core only)
from flows.engine import precision  # noqa: E402  (torch only)
from flows.engine.increments import Step, pack  # noqa: E402
from nas_core.anchor import calibrate  # noqa: E402
from nas_core.editors import AlphaEditEditor  # noqa: E402
from nas_core.evaluate.counterfact import edit_metrics  # noqa: E402
from nas_core.evaluate.health import perplexity  # noqa: E402
from nas_core.requests import EditRequest  # noqa: E402
from nas_core.spec import spec_for  # noqa: E402
from nas_core.stats import second_moment, token_batches  # noqa: E402

WORDS = ("Paris", "Rome", "Berlin", "Tokyo", "Madrid", "Lima", "Oslo", "Cairo", "Delhi", "Quito")


class Clock:
    """Phase timings, with a budget: ``over()`` once the run has used it up."""

    def __init__(self, device: torch.device, budget: float):
        self.device, self.budget, self.t0 = device, budget, time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn):
        self.sync()
        t = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t

    def over(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def shaped_model(scale: str, device: torch.device, dtype: torch.dtype):
    """A random LlamaForCausalLM with Llama-3-8B's shapes (``8b``) or a scaled-down one (``tiny``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0) if scale == "8b" else
              dict(hidden_size=64, intermediate_size=224, num_hidden_layers=10, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512))
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **shapes))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def synthetic_requests(n: int, seed: int = 0) -> list[EditRequest]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        true, new = (WORDS[int(j)] for j in torch.randperm(len(WORDS), generator=g)[:2])
        out.append(EditRequest(f"s{i}", "The home city of {} is", f"Entity {i}", target_new=new, target_true=true,
                               paraphrase_prompts=(f"Entity {i} was born in",)))
    return out


def part_a(args, device: torch.device, clock: Clock) -> dict:
    """The 8B-shaped model: statistics, projector, anchor, edits at batch 1 and 25, memory, bytes."""
    import dataclasses

    from tiny import tiny_tokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, load_s = clock.time(lambda: shaped_model(args.scale, device, dtype))
    tok, spec, res = tiny_tokenizer(), spec_for(model), {"load_s": load_s, "weights_dtype": str(dtype)}
    s = config_for("llama3-8b", REPO / "configs").method("alphaedit", True)
    if args.scale == "tiny":
        s = dataclasses.replace(s, layers=(2, 3, 4), values=dataclasses.replace(s.values, steps=3))
    s = precision.resolve(dataclasses.replace(s, nullspace_relative_threshold=1e-2), device)
    res["compute_dtype"] = s.values.compute_dtype
    tokens = 65536 if args.scale == "8b" else 1024
    ids = torch.randint(3, tok.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    stats, secs = clock.time(lambda: second_moment(model, spec, s.layers, token_batches(ids, 512, 8, device)))
    res["stats_tokens_per_s"] = stats.tokens / secs
    editor = AlphaEditEditor(s, stats.cov)
    state, res["projector_s"] = clock.time(lambda: editor.init_state(model))
    pilots = synthetic_requests(10 if args.scale == "8b" else 2, seed=1)
    cal, res[f"anchor_{len(pilots)}_pilots_s"] = clock.time(
        lambda: calibrate(model, tok, spec, pilots, s.layers[-1], s.values, s.nas))
    state = dataclasses.replace(state, reference_norm=cal.reference_norm)
    reqs = synthetic_requests(26)
    one, res["edit_batch1_s"] = clock.time(lambda: editor.compute(model, tok, reqs[:1], state))
    if not clock.over():
        many, secs = clock.time(lambda: editor.compute(model, tok, reqs[1:], one.state))
        res["edit_batch25_s_per_edit"] = secs / 25
        res["night_24_increment_bytes"] = round(len(save(pack([Step.of(many)])[0])) * 24 / 25)
    res["peak_memory_gb"] = peak_memory_gb(device)
    res["efficacy_batch1"] = edit_metrics(model, tok, reqs[:1]).efficacy_success
    return res


def load_folder(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    return model.eval().requires_grad_(False), tok


def part_b(args, device: torch.device, clock: Clock) -> dict:
    """The real SmolLM2: CPU-vs-device parity of one edit, then the AlphaEdit +/- NAS horizon."""
    from nas_core.formats import from_any_layout

    cfg = config_for(str(args.config) if args.config else "smollm2-135m", REPO / "configs")
    model, tok = load_folder(args.smollm, device)
    spec, text = spec_for(model), args.corpus.read_text(encoding="utf-8")
    ids = tok(text).input_ids[: args.stats_tokens]
    settings = precision.resolve(cfg.method("alphaedit", True), device)
    cov = second_moment(model, spec, settings.layers, token_batches(ids, 512, 8, device)).cov
    stream = list(from_any_layout(json.loads(args.stream.read_text(encoding="utf-8"))).requests)
    canary = ids[: args.canary_tokens]
    res: dict = {}
    cpu_model, _ = load_folder(args.smollm, torch.device("cpu"))
    pilots = stream[-10:]
    a = calibrate(model, tok, spec, pilots, settings.layers[-1], settings.values, settings.nas).reference_norm
    deltas = []
    for m in (cpu_model, model):
        ed = AlphaEditEditor(settings, {k: v.to(next(m.parameters()).device) for k, v in cov.items()})
        st = ed.init_state(m).__class__(**{**ed.init_state(m).__dict__, "reference_norm": a})
        deltas.append(next(iter(ed.compute(m, tok, stream[:1], st).deltas.values())).cpu())
    res["parity_relative_diff"] = float((deltas[1] - deltas[0]).norm() / deltas[0].norm())
    del cpu_model
    base_ppl = perplexity(load_folder(args.smollm, device)[0], canary)
    for nas in (False, True):
        label = "alphaedit+nas" if nas else "alphaedit"
        if clock.over():
            res[label] = "skipped: budget"
            continue
        res[label] = horizon(args, device, cov, cfg, nas, a, stream, canary, base_ppl, clock)
    return res


def horizon(args, device, cov, cfg, nas: bool, a: float, stream, canary, base_ppl: float, clock: Clock) -> dict:
    """One method over the stream at batch 25; points every 250 edits; its collapse point."""
    import random

    model, tok = load_folder(args.smollm, device)
    s = precision.resolve(cfg.method("alphaedit", nas), device)
    ed = AlphaEditEditor(s, cov)
    state = ed.init_state(model).__class__(**{**ed.init_state(model).__dict__, "reference_norm": a if nas else None})
    points, cp, t0 = [], None, time.perf_counter()
    n = min(args.horizon_edits, len(stream) - 10)
    for start in range(0, n, 25):
        state = ed.compute(model, tok, stream[start:start + 25], state).state
        done = min(start + 25, n)
        if done % 250 and done != n:
            continue
        sample = random.Random(0).sample(stream[:done], min(200, done))
        score = edit_metrics(model, tok, sample).editing_score
        ratio = perplexity(model, canary) / base_ppl
        points.append({"edits": done, "editing_score": score, "perplexity_ratio": ratio})
        if cp is None and ((score or 0) < 60 or ratio > 2):
            cp = done
        if clock.over():
            break
    return {"points": points, "collapse_point": cp, "s_per_edit": (time.perf_counter() - t0) / points[-1]["edits"]}


def table(res: dict) -> str:
    rows = [("device", res["device"])]
    for key, value in res.get("a", {}).items():
        rows.append((f"(a) {key}", f"{value:.4g}" if isinstance(value, float) else str(value)))
    for key, value in res.get("b", {}).items():
        if isinstance(value, dict):
            value = f"collapse point {value['collapse_point']}, {value['s_per_edit']:.3f} s/edit, last point " \
                    f"{value['points'][-1] if value['points'] else None}"
        rows.append((f"(b) {key}", f"{value:.4g}" if isinstance(value, float) else str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", choices=("8b", "tiny"), default="8b")
    p.add_argument("--smollm", type=Path)
    p.add_argument("--config", type=Path, help="model config for (b) (default: configs/smollm2-135m.yaml)")
    p.add_argument("--corpus", type=Path)
    p.add_argument("--stream", type=Path)
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--canary-tokens", type=int, default=2048)
    p.add_argument("--horizon-edits", type=int, default=2000)
    p.add_argument("--budget-s", type=float, default=450.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "gpu-check.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    clock = Clock(device, args.budget_s)
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "a": part_a(args, device, clock)}
    if args.smollm is not None:
        res["b"] = part_b(args, device, clock) if not clock.over() else {"skipped": "budget"}
    res["seconds"] = time.perf_counter() - clock.t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    return res


if __name__ == "__main__":
    main()
