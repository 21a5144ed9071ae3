"""The audit's verdict: is the champion ``dvc repro`` rebuilt the one the ledger promoted, bit for bit or
within numerical tolerance?"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.audit.machine import machine_differences
from flows.audit.outputs import METRICS_JSON, PROMOTION_JSON, REPLAY_JSON
from flows.config.params import Params
from flows.io import read_json
from flows.ledger.lineage import champion_of
from flows.ledger.records import Ledger

REPRODUCED, WITHIN_TOLERANCE = "reproduced", "reproduced within tolerance"
NOT_REPRODUCED, NOT_REPLAYED, STALE = "NOT REPRODUCED", "NOT REPLAYED", "STALE"
#: The earlier name of NOT_REPRODUCED (a different hash), kept for scripts that compare it.
MISMATCH = NOT_REPRODUCED

SAME_MACHINE_NOTE = ("bit-identical rebuilds are expected on the same machine type and software; a different "
                     "CPU, BLAS/LAPACK, torch version or thread count can change the last bits")

#: Retention metrics compared in percentage points (the rest of the tolerance check is the ppl ratio).
SCORE_METRICS = ("efficacy_success", "generalisation_success", "specificity_success", "editing_score")


@dataclass(frozen=True)
class AuditResult:
    """The audit's verdict with both hashes and the machine facts at promotion and replay."""

    verdict: str
    champion: str | None
    ledger_weights_hash: str | None
    replay_weights_hash: str | None
    machine_at_promotion: dict[str, Any] | None
    machine_at_replay: dict[str, Any] | None
    machine_differences: dict[str, tuple[Any, Any]]
    explanation: str
    replay: dict[str, Any] | None = None

    checks: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.verdict in (REPRODUCED, WITHIN_TOLERANCE)

    def render(self) -> str:
        lines = [f"verdict: {self.verdict}",
                 f"champion: {self.champion or 'base model (no promotion yet)'}",
                 f"ledger weights hash: {self.ledger_weights_hash}",
                 f"replay weights hash: {self.replay_weights_hash}"]
        if self.machine_differences:
            lines.append("machine at promotion vs replay differs in:")
            lines += [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in self.machine_differences.items()]
        elif self.machine_at_promotion and self.machine_at_replay:
            m = self.machine_at_replay
            lines.append(f"same machine facts at promotion and replay: torch {m.get('torch')}, {m.get('cpu_model')} "
                         f"({m.get('cpu_capability')}), BLAS {m.get('blas')}, {m.get('threads')} threads, "
                         f"{m.get('device')} {m.get('dtype')}")
        lines += [f"  {c}" for c in self.checks]
        lines.append(self.explanation)
        return "\n".join(lines)


def audit(params: Params) -> AuditResult:
    """Compare what ``dvc repro`` rebuilt (replay.json) with the ledger's champion.

    Verdicts: ``reproduced`` (same weights hash); ``reproduced within tolerance`` (another
    hash, but every version's per-layer fingerprint, the night's inputs and the champion's
    metrics within params.yaml ``audit``); ``NOT REPRODUCED`` (naming the first version and
    layer outside it, or the metric); ``NOT REPLAYED`` (nothing rebuilt or scored yet);
    ``STALE`` (the replay rebuilt another champion than the ledger's). ``ok`` for the first two.
    """
    repo = params.root
    ledger = Ledger(params.roots.ledger)
    version, whash = champion_of(ledger)
    replay = read_json(repo / REPLAY_JSON)
    promotion = read_json(repo / PROMOTION_JSON)
    at_promotion = None
    if promotion and promotion.get("version") == version:
        at_promotion = promotion.get("machine")
    if at_promotion is None and version is not None:
        at_promotion = (ledger.promotion(version) or {}).get("machine")
    at_replay = replay.get("machine") if replay else None
    rebuilt = replay.get("weights_hash") if replay else None
    diffs = machine_differences(at_promotion, at_replay)

    def result(verdict: str, explanation: str, checks: list[str] = ()) -> AuditResult:
        return AuditResult(verdict, version, whash, rebuilt, at_promotion, at_replay, diffs, explanation, replay,
                           tuple(checks))

    if replay is None:
        return result(NOT_REPLAYED, f"{REPLAY_JSON} is missing: run `dvc repro --force --single-item replay`")
    if replay.get("source") != "replay":
        return result(NOT_REPLAYED, f"{REPLAY_JSON} was written at promotion, nothing was rebuilt: run "
                                    "`dvc repro --force --single-item replay` (or `nas audit --repro`)")
    if replay.get("ledger_champion") != version:
        return result(STALE, f"the replay rebuilt {replay.get('ledger_champion') or 'the base model'}, but the "
                             f"ledger's champion is {version or 'the base model'}: run the replay again")
    if version is None:
        return result(REPRODUCED, "no promotion yet: the replay is the base model")
    if rebuilt == whash:
        note = ("reproduced bit for bit even though the machine facts differ" if diffs else
                "reproduced bit for bit" + ("" if at_promotion else " (the promotion's machine facts were "
                                            "not recorded)"))
        return result(REPRODUCED, note)
    machine = (f"the machine differs in {', '.join(diffs)}" if diffs else "the machine facts are the same"
               if at_promotion else "the promotion's machine facts were not recorded")
    problem = _first_divergence(replay.get("versions", []), params.audit.weights_rel_tol)
    if problem is not None:
        return result(NOT_REPRODUCED, f"{problem}; {machine}. " + (
            SAME_MACHINE_NOTE + "." if diffs else "The ledger, the accepted batches, params.yaml, the model config, "
            "the statistics corpus or the code differ from what the nightly flow used."))
    tol = params.audit
    worst = max(((v["version"], name, r) for v in replay["versions"]
                 for name, r in (v.get("divergence") or {}).items()), key=lambda t: t[2], default=None)
    checks = [f"weights: every version's per-layer update fingerprint within {tol.weights_rel_tol:g} of the "
              "ledger's" + (f" (largest {worst[2]:.1e}: {worst[0]} {worst[1]})" if worst else "")]
    compared = _metric_differences(read_json(repo / METRICS_JSON), ledger.promotion(version) or {}, version, tol)
    if compared is None:
        return result(NOT_REPLAYED, "the weights are within tolerance, but the rebuilt champion was not scored: run "
                                    "`dvc repro evaluate` to compare the promotion's metrics", checks)
    metric_lines, failed = compared
    checks += metric_lines
    if failed:
        return result(NOT_REPRODUCED, f"the weights are within tolerance but {'; '.join(failed)}; {machine}", checks)
    return result(WITHIN_TOLERANCE, f"not bit-identical ({machine}), but every version's weights and the champion's "
                                    "metrics are within the audit tolerances of params.yaml", checks)


def _first_divergence(versions: list[dict[str, Any]], rel_tol: float) -> str | None:
    """What first puts a non-identical replay outside the tolerance, naming version and layer; None: nothing."""
    for v in versions:
        if v.get("match"):
            continue
        name = v["version"]
        for key, r in (v.get("inputs_divergence") or {}).items():
            if r > rel_tol:
                return (f"{name}: the night's {key} differs by {r:.1e} relative (tolerance {rel_tol:g}): the "
                        "statistics corpus or the NAS pilot facts are not the night's")
        if not v.get("same_skips", True):
            return f"{name}: NAS skipped other requests than the night did"
        if v.get("divergence") is None:
            return (f"{name} differs and the ledger holds no fingerprint of it (promoted before fingerprints "
                    "were recorded), so only a bit-identical rebuild can be confirmed")
        layer, r = max(v["divergence"].items(), key=lambda kv: kv[1])
        if r > rel_tol:
            return f"{name} diverges first: layer {layer} by {r:.1e} relative to its update (tolerance {rel_tol:g})"
    return None


def _metric_differences(metrics: dict[str, Any] | None, promotion: dict[str, Any], version: str,
                        tol) -> tuple[list[str], list[str]] | None:
    """(a line per compared metric, the ones outside tolerance), or None when the replay's
    metrics.json is missing or scored another version."""
    if not metrics or metrics.get("source") != "replay" or metrics.get("version") != version:
        return None
    recorded = {k.removeprefix("retention."): v for k, v in (promotion.get("metrics") or {}).items()
                if k.startswith("retention.")}
    lines, failed = [], []
    for key in (*SCORE_METRICS, "perplexity_ratio"):
        a, b = recorded.get(key), metrics.get(key)
        if a is None or b is None:
            continue
        if key == "perplexity_ratio":
            diff, bound, unit = abs(b - a) / abs(a), tol.perplexity_ratio_rel_tol, " relative"
        else:
            diff, bound, unit = abs(b - a), tol.score_abs_tol, " points"
        line = f"{key}: {b:.4g} rebuilt, {a:.4g} promoted (difference {diff:.3g}{unit}, tolerance {bound:g})"
        lines.append(line)
        if diff > bound:
            failed.append(f"{key} differs by {diff:.3g}{unit} (tolerance {bound:g})")
    return lines, failed


def repro(repo: Path) -> None:
    """``dvc repro --force --single-item replay`` then ``dvc repro evaluate``, with this Python on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for args in (["repro", "--force", "--single-item", "replay"], ["repro", "evaluate"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, check=True)
