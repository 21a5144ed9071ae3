"""The audit's verdict: does the replayed champion have the weights hash the ledger promoted?"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.audit.machine import machine_differences
from flows.audit.outputs import PROMOTION_JSON, REPLAY_JSON
from flows.config.params import Params
from flows.io import read_json
from flows.ledger.lineage import champion_of
from flows.ledger.records import Ledger

REPRODUCED, MISMATCH, NOT_REPLAYED, STALE = "reproduced", "MISMATCH", "NOT REPLAYED", "STALE"

SAME_MACHINE_NOTE = ("bit-identical rebuilds are expected on the same machine type and software; a different "
                     "CPU, BLAS/LAPACK, torch version or thread count can change the last bits")


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

    @property
    def ok(self) -> bool:
        return self.verdict == REPRODUCED

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
        lines.append(self.explanation)
        return "\n".join(lines)


def audit(params: Params) -> AuditResult:
    """Compare what ``dvc repro`` rebuilt (replay.json) with the ledger's champion.

    Verdicts: ``reproduced`` (same weights hash), ``MISMATCH`` (different; the machine
    differences explain it or not), ``NOT REPLAYED`` (replay.json is missing or was written
    at promotion: run the replay), ``STALE`` (the replay rebuilt another champion than the
    ledger's current one).
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

    def result(verdict: str, explanation: str) -> AuditResult:
        return AuditResult(verdict, version, whash, rebuilt, at_promotion, at_replay, diffs, explanation, replay)

    if replay is None:
        return result(NOT_REPLAYED, f"{REPLAY_JSON} is missing: run `dvc repro --force --single-item replay`")
    if replay.get("source") != "replay":
        return result(NOT_REPLAYED, f"{REPLAY_JSON} was written at promotion, nothing was rebuilt: run "
                                    "`dvc repro --force --single-item replay` (or `nas audit --repro`)")
    if replay.get("ledger_champion") != version:
        return result(STALE, f"the replay rebuilt {replay.get('ledger_champion') or 'the base model'}, but the "
                             f"ledger's champion is {version or 'the base model'}: run the replay again")
    if version is not None and rebuilt == whash:
        note = ("reproduced bit for bit even though the machine facts differ" if diffs else
                "reproduced bit for bit" + ("" if at_promotion else " (the promotion's machine facts were "
                                            "not recorded)"))
        return result(REPRODUCED, note)
    if version is None:
        return result(REPRODUCED, "no promotion yet: the replay is the base model")
    if diffs:
        return result(MISMATCH, "the rebuilt weights differ from the promoted ones, and the machine differs in "
                                f"{', '.join(diffs)}: {SAME_MACHINE_NOTE}. Replay on the promotion's machine type "
                                "to tell a machine effect from a real discrepancy.")
    if at_promotion is None:
        return result(MISMATCH, "the rebuilt weights differ from the promoted ones; the promotion's machine facts "
                                f"were not recorded, so a machine effect cannot be ruled out ({SAME_MACHINE_NOTE})")
    first = next((b for b in replay.get("versions", []) if not b.get("match")), None)
    where = f" The first divergence is at {first['version']}." if first else ""
    return result(MISMATCH, "the rebuilt weights differ from the promoted ones on the same machine facts: the "
                            "ledger, the accepted batches, params.yaml, the model config or the code differ from "
                            f"what the nightly flow used.{where}")


def repro(repo: Path) -> None:
    """``dvc repro --force --single-item replay`` then ``dvc repro evaluate``, with this Python on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for args in (["repro", "--force", "--single-item", "replay"], ["repro", "evaluate"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, check=True)
