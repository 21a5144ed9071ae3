"""Scoring batches: the old shortest-first greedy fill against the padding-minimising cut, in one process.

Usage: python scripts/bench_scoring_batches.py [ROUNDS] — the measurements of a horizon point and of a
night on SmolLM2-135M: the general tasks at 10 items per task (a study point) and 50 (a night), and
retention's CounterFact scoring of 210 edits (a study point's sample plus its last batch). Each
workload is scored once per grouping per round, alternating, so host drift hits both alike. Prints
the machine, the padded tokens, the batches, the seconds of each grouping and whether the scores agree.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence

import torch

import nas_core.evaluate.scoring as scoring
from flows.assets.load import load_model
from flows.config.params import load_params
from flows.engine import precision
from flows.engine.evaluation import general_records
from flows.studies.horizon import stream_requests
from nas_core.evaluate.counterfact import edit_metrics_and_facts
from nas_core.evaluate.health import option_accuracy, option_items
from nas_core.prompts import tokenise_filled

NEW = scoring.length_batches


def greedy_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """The grouping before the cut (commit 86d3c83): fill each batch shortest first up to the caps."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        cur = batches[-1] if batches else None
        if cur is None or len(cur) >= max_rows or (len(cur) + 1) * lengths[i] > max_tokens:
            batches.append([i])
        else:
            cur.append(i)
    return batches


def padded(batches: list[list[int]], lengths: Sequence[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    params = load_params()
    model, tok = load_model(params.roots.models / "smollm2-135m")
    ev = params.eval
    facts = precision.cpu_facts()
    print(f"cpu {facts['cpu']}, bf16 flags {facts['bf16_flags'] or 'none'}, {torch.get_num_threads()} threads; "
          f"eval batch_size {ev.batch_size}, batch_tokens {ev.batch_tokens}, overhead {scoring.BATCH_OVERHEAD_TOKENS}")
    workloads = {}
    for n in (10, 50):
        recs = general_records(dataclasses.replace(ev, general_items=n), params.roots.general_tasks)
        items = [it for task, r in recs.items() for it in option_items(task, r)]
        lengths = [len(tokenise_filled(tok, it.prompt).ids) for it in items]
        workloads[f"general tasks, {n} items/task"] = (
            lengths, lambda items=items: option_accuracy(model, tok, items, ev.batch_size, ev.batch_tokens))
    reqs = stream_requests(params.roots.horizon_stream, 210)

    def retention():
        return edit_metrics_and_facts(model, tok, reqs, ev.batch_size, ev.batch_tokens)[0].as_dict()

    workloads["retention, 210 edits"] = (row_lengths(retention), retention)
    for name, (lengths, run) in workloads.items():
        caps = (ev.batch_size, ev.batch_tokens)
        old_b, new_b = greedy_batches(lengths, *caps), NEW(lengths, *caps)
        print(f"{name}: {len(lengths)} rows, {sum(lengths)} tokens; padded tokens old {padded(old_b, lengths)} "
              f"in {len(old_b)} batches, new {padded(new_b, lengths)} in {len(new_b)} batches", flush=True)
        seconds = {"old": [], "new": []}
        results = {}
        for rnd in range(rounds):
            for label in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
                scoring.length_batches = greedy_batches if label == "old" else NEW
                t0 = time.perf_counter()
                results[label] = run()
                seconds[label].append(time.perf_counter() - t0)
        scoring.length_batches = NEW
        old_s, new_s = (sum(v) / len(v) for v in (seconds["old"], seconds["new"]))
        print(f"  old {old_s:.2f} s, new {new_s:.2f} s ({(new_s / old_s - 1) * 100:+.0f}%); "
              f"scores {agreement(results['old'], results['new'])}", flush=True)


def row_lengths(run) -> list[int]:
    """The lengths of the forward rows ``run`` batches (one run, the lengths seen by the grouping)."""
    seen: list[int] = []

    def spy(lengths, *caps):
        seen.extend(lengths)
        return NEW(lengths, *caps)

    scoring.length_batches = spy
    try:
        run()
    finally:
        scoring.length_batches = NEW
    return seen


def agreement(old, new) -> str:
    if isinstance(old, float):
        return f"old {old:.2f}, new {new:.2f}" + (" (equal)" if old == new else "")
    diffs = {k: abs(old[k] - new[k]) for k in old if isinstance(old[k], float) and isinstance(new.get(k), float)}
    worst = max(diffs, key=diffs.get)
    return f"largest metric difference {diffs[worst]:.2e} ({worst})"


if __name__ == "__main__":
    main()
