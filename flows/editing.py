"""The I/O around the engine: statistics and anchor caches, edit runs, checkpoints.

Everything here reads or writes files; the math is in nas_core. Paths default to the
repository's ``data/`` folder and can be pointed elsewhere (tests use a temp dir).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file, save_file
from torch import nn

from flows import precision
from flows.checkpoints import TENSOR_FILES, file_hashes, read_verified
from flows.config import REPO
from flows.io import atomic_write_bytes
from nas_core.anchor import calibrate
from nas_core.deltas import accumulate, edited_weights, frobenius_norms, materialise, weights_hash
from nas_core.editors import VARIANTS, AlphaEditEditor, MemitEditor, RomeEditor, base_method
from nas_core.editors.base import Editor, EditResult
from nas_core.formats import from_counterfact_easyedit, parse_fact_jsonl
from nas_core.requests import EditRequest
from nas_core.settings import AlphaEditSettings, MemitSettings, RomeSettings, StatsSettings
from nas_core.spec import spec_for
from nas_core.state import EditState
from nas_core.stats import sample_self_text, second_moment, token_batches

log = logging.getLogger(__name__)

DATA = REPO / "data"
SHARED_DATA = REPO.parent / "shared" / "data"
WIKITEXT = SHARED_DATA / "text" / "wikitext-2-raw-wiki.test.raw"
PILOT_SOURCE = SHARED_DATA / "counterfact" / "counterfact-train.json"
# Shipped with the project: pilots for machines without ../shared (a demo-sized anchor).
FALLBACK_PILOTS = DATA / "demo" / "pilot_facts.jsonl"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename (never a half-written file)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- covariance statistics -------------------------------------------------------------------

def corpus_text(settings: StatsSettings, model: nn.Module, tok) -> tuple[str, str]:
    """The corpus text and a description of it. ``self`` samples from the model (data-free)."""
    c = settings.corpus
    if c == "wikitext":
        if not WIKITEXT.is_file():
            raise FileNotFoundError(
                f"corpus 'wikitext' expects {WIKITEXT}; set stats.corpus to a text file or 'self'"
            )
        return WIKITEXT.read_text(encoding="utf-8"), f"file:{WIKITEXT.name}"
    if c == "self":
        # Enough sequences for the token budget; seeded, so the same model gives the same text.
        n_seq = max(1, settings.tokens // settings.seq_len)
        log.warning("stats corpus 'self': data-free calibration on %d sequences the model samples "
                    "itself; no real text is used", n_seq)
        texts = sample_self_text(model, tok, n_seq, settings.seq_len, settings.seed)
        return "\n".join(texts), f"self:seed={settings.seed}"
    if c.startswith("dataset:"):
        import datasets

        parts = c.split(":")[1:]
        if len(parts) == 3:
            name, split, column = parts
            cfg = None
        elif len(parts) == 4:
            name, cfg, split, column = parts
        else:
            raise ValueError(f"stats.corpus {c!r}: use dataset:NAME[:CONFIG]:SPLIT:COLUMN")
        ds = datasets.load_dataset(name, cfg, split=split)
        return "\n".join(str(x) for x in ds[column]), c
    path = Path(c)
    if not path.is_file():
        raise FileNotFoundError(f"stats.corpus {c!r} is neither 'wikitext', 'self', a dataset: spec "
                                "nor an existing text file")
    return path.read_text(encoding="utf-8"), f"file:{path.name}"


def corpus_token_ids(tok, text: str, limit: int, chunk_chars: int = 20_000) -> list[int]:
    """Token ids of ``text`` up to ``limit``, tokenised in line-aligned chunks (a whole corpus
    in one call trips the tokenizer's max-length warning and costs memory)."""
    ids: list[int] = []
    start = 0
    while start < len(text) and len(ids) < limit:
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        ids.extend(tok(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return ids[:limit]


def ensure_stats(
    model: nn.Module,
    tok,
    model_name: str,
    layers: Sequence[int],
    settings: StatsSettings,
    base_hash: str,
    root: Path = DATA / "stats",
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> tuple[dict[int, torch.Tensor], Path, bool]:
    """C for ``layers``, from the cache when the same inputs were measured before.

    Returns (covariances, file, cached?). The cache key covers the weights hash, layers,
    corpus and its hash, token budget, sequence length and seed.
    """
    layers = sorted(set(layers))
    if settings.corpus == "wikitext" and not WIKITEXT.is_file():
        log.warning("no corpus: %s is absent, so C is measured data-free on text the model samples "
                    "itself (set stats.corpus to a real text file for better statistics)", WIKITEXT)
        settings = dataclasses.replace(settings, corpus="self")
    text, corpus_desc = corpus_text(settings, model, tok) if settings.corpus != "self" else ("", "self")
    corpus_hash = hashlib.sha256(text.encode()).hexdigest()[:16] if text else f"self-{settings.seed}"
    key = {"weights": base_hash, "layers": layers, "corpus": settings.corpus, "corpus_hash": corpus_hash,
           "tokens": settings.tokens, "seq_len": settings.seq_len, "seed": settings.seed}
    path = root / model_name / f"cov-{digest(key)}.safetensors"
    if path.is_file() and not force:
        tensors = load_file(path)
        return {int(k.split(".")[1]): v for k, v in tensors.items()}, path, True
    if settings.corpus == "self":
        text, corpus_desc = corpus_text(settings, model, tok)
    ids = corpus_token_ids(tok, text, settings.tokens)
    spec = spec_for(model)
    device = next(model.parameters()).device
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(ids))

    t0 = time.perf_counter()
    sm = second_moment(model, spec, layers, token_batches(ids, settings.seq_len, settings.batch_size, device),
                       progress=tick)
    seconds = time.perf_counter() - t0
    meta = {**{k: json.dumps(v) for k, v in key.items()}, "corpus_desc": corpus_desc,
            "token_count": str(sm.tokens), "seconds": f"{seconds:.1f}", "created": now()}
    atomic_save_tensors(path, {f"cov.{layer}": c for layer, c in sm.cov.items()}, meta)
    log.info("stats: %d tokens, layers %s, %.1f s (%.0f tokens/s) -> %s", sm.tokens, layers, seconds,
             sm.tokens / max(seconds, 1e-9), path)
    return sm.cov, path, False


# --- NAS anchors -----------------------------------------------------------------------------

def pilot_requests(n: int, seed: int, source: Path = PILOT_SOURCE) -> list[EditRequest]:
    """A seeded sample of ``n`` CounterFact requests (the training split, never the eval one).

    Without ../shared the project's own 20 pilot facts are used instead, with a warning.
    """
    if source.is_file():
        reqs = list(from_counterfact_easyedit(json.loads(source.read_text(encoding="utf-8"))).requests)
    else:
        log.warning("NAS pilots: %s is absent; using the %s shipped pilot facts instead", source,
                    FALLBACK_PILOTS.name)
        reqs = list(parse_fact_jsonl(FALLBACK_PILOTS.read_text(encoding="utf-8")).requests)
    rng = random.Random(seed)
    return rng.sample(reqs, min(n, len(reqs)))


def ensure_anchor(
    model: nn.Module,
    tok,
    model_name: str,
    method: str,
    settings: MemitSettings | AlphaEditSettings | RomeSettings,
    base_hash: str,
    root: Path = DATA / "anchors",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], Path, bool]:
    """The NAS reference norm for ``settings``' last layer, calibrated once on the base model.

    The caller must pass the *unedited* model: the hash of its weights is checked against
    ``base_hash`` so an anchor is never calibrated on an edited model.
    """
    settings = precision.resolve(settings, next(model.parameters()).device)
    layer = settings.layers[-1]
    values = dataclasses.asdict(settings.values)
    if values["compute_dtype"] == "float32":
        del values["compute_dtype"]  # the key of every anchor calibrated before the setting existed
    if values["attention"] == "default":
        del values["attention"]  # likewise
    key = {"weights": base_hash, "layer": layer, "values": values,
           "pilots": settings.nas.pilots, "drop": settings.nas.drop_top_fraction, "seed": settings.nas.seed,
           "pilot_source": PILOT_SOURCE.name if PILOT_SOURCE.is_file() else FALLBACK_PILOTS.name}
    path = root / model_name / f"anchor-L{layer}-{digest(key)}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), path, True
    if weights_hash(model) != base_hash:
        raise RuntimeError("refusing to calibrate NAS on an edited model: load the base model")
    pilots = pilot_requests(settings.nas.pilots, settings.nas.seed)
    t0 = time.perf_counter()
    cal = calibrate(model, tok, spec_for(model), pilots, layer, settings.values, settings.nas, progress)
    record = {
        "reference_norm": cal.reference_norm,
        "layer": layer,
        "pilots": cal.pilots,
        "dropped": cal.dropped,
        "seed": settings.nas.seed,
        "pilot_source": PILOT_SOURCE.name if PILOT_SOURCE.is_file() else FALLBACK_PILOTS.name,
        "settings": {"values": dataclasses.asdict(settings.values), "nas": dataclasses.asdict(settings.nas)},
        "base_weights_hash": base_hash,
        "method_hint": method,
        "seconds": round(time.perf_counter() - t0, 1),
        "created": now(),
        "pilot_norms": list(cal.norms),
    }
    atomic_write_text(path, json.dumps(record, indent=1))
    return record, path, False


# --- editors and checkpoints -----------------------------------------------------------------

def make_editor(method: str, settings, cov: dict[int, torch.Tensor]) -> Editor:
    """The editor of a method or a baseline variant (``memit-plain`` runs MEMIT's class)."""
    editors = {"memit": MemitEditor, "alphaedit": AlphaEditEditor, "rome": RomeEditor}
    base = base_method(method)
    if base not in editors:
        raise ValueError(f"unknown method {method!r}; known: {sorted(editors)} and {sorted(VARIANTS)}")
    return editors[base](settings, cov)


@dataclasses.dataclass
class EditSession:
    """A model being edited: base weights kept for exact materialisation, D, state, log."""

    model: nn.Module
    tok: Any
    model_name: str
    method: str
    settings: Any
    editor: Editor
    base_hash: str
    base: dict[str, torch.Tensor]
    cumulative: dict[str, torch.Tensor]
    state: EditState
    original_norms: dict[str, float]
    request_log: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    batch_log: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def apply(self, requests: Sequence[EditRequest]) -> EditResult:
        """Edit one batch, then re-materialise W = W_base + D so D is the single truth."""
        t0 = time.perf_counter()
        result = self.editor.compute(self.model, self.tok, requests, self.state)
        self.cumulative = accumulate(self.cumulative, result.deltas)
        materialise(self.model, self.base, self.cumulative)
        self.state = result.state
        seconds = time.perf_counter() - t0
        for r in result.requests:
            self.request_log.append(dataclasses.asdict(r))
        self.batch_log.append({"size": len(requests), "seconds": round(seconds, 3),
                               "timings": {k: round(v, 3) for k, v in result.timings.items()},
                               "layer_delta_norms": result.layer_delta_norms})
        return result

    def use_path(self, compute_dtype: str, attention: str) -> None:
        """Take a recorded v* path for the next edits (a replay of a night that took it)."""
        values = self.settings.values
        if (compute_dtype, attention) != (values.compute_dtype, values.attention):
            self.settings = precision.with_path(self.settings, compute_dtype, attention)
            self.editor.settings = self.settings

    @property
    def compute_dtype(self) -> str:
        return self.settings.values.compute_dtype

    @property
    def attention(self) -> str:
        return self.settings.values.attention

    def norms(self) -> dict[str, dict[str, float]]:
        now_norms = frobenius_norms(self.model, list(self.base))
        return {n: {"before": self.original_norms[n], "after": now_norms[n],
                    "ratio": now_norms[n] / self.original_norms[n]} for n in self.base}


def open_session(
    model: nn.Module,
    tok,
    model_name: str,
    method: str,
    settings,
    cov: dict[int, torch.Tensor],
    base_hash: str,
    reference_norm: float | None,
    checkpoint: Path | None = None,
    recorded_files: dict[str, str] | None = None,
) -> EditSession:
    """Start editing the base ``model``, or continue from ``checkpoint`` (its files checked
    against their manifest and, given, the ledger's ``recorded_files``). ``auto`` precision is
    resolved for the model's device here (:mod:`flows.precision`)."""
    settings = precision.resolve(settings, next(model.parameters()).device)
    spec = spec_for(model)
    names = [spec.weight_name(layer) for layer in settings.layers]
    base = edited_weights(model, names)
    editor = make_editor(method, settings, cov)
    original = frobenius_norms(model, names)
    if checkpoint is None:
        state = dataclasses.replace(editor.init_state(model), reference_norm=reference_norm)
        return EditSession(model, tok, model_name, method, settings, editor, base_hash, base, {}, state,
                           original)
    ckpt = read_checkpoint(checkpoint, recorded_files)
    man = ckpt["manifest"]
    if man["base_weights_hash"] != base_hash:
        raise ValueError(f"checkpoint {checkpoint} was made from base weights "
                         f"{man['base_weights_hash'][:12]}, not the loaded model's {base_hash[:12]}")
    if man["method"] != method:
        raise ValueError(f"checkpoint {checkpoint} is a {man['method']} checkpoint, not {method}")
    materialise(model, base, ckpt["deltas"])
    session = EditSession(model, tok, model_name, method, settings, editor, base_hash, base, ckpt["deltas"],
                          ckpt["state"], original)
    session.request_log = list(man.get("requests", []))
    session.batch_log = list(man.get("batches", []))
    return session


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the fully written folder ``tmp`` at ``out`` (two renames; an old ``out`` is removed last),
    so a reader never sees a half-written folder."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_checkpoint(session: EditSession, out: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write deltas.safetensors, state.safetensors and manifest.json into ``out`` atomically.

    The folder is assembled under a temp name and renamed, so a crash leaves either the
    old checkpoint or the new one, never half of one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in session.cumulative.items()}, tmp / "deltas.safetensors")
        save_file(session.state.state_dict(), tmp / "state.safetensors")
        manifest = {
            "files": file_hashes(tmp, TENSOR_FILES),
            "format": "nas-checkpoint/1",
            "model": session.model_name,
            "base_weights_hash": session.base_hash,
            "weights_hash": weights_hash(session.model),
            "method": session.method,
            "settings": dataclasses.asdict(session.settings),
            "edited_weights": sorted(session.base),
            "edit_count": session.state.edit_count,
            "skipped_count": session.state.skipped_count,
            "reference_norm": session.state.reference_norm,
            "request_ids": [r["case_id"] for r in session.request_log if not r["skipped"]],
            "norms": session.norms(),
            "requests": session.request_log,
            "batches": session.batch_log,
            "created": now(),
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_checkpoint(path: Path, recorded_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Load a checkpoint folder (safetensors only, never pickle), every file checked against
    its recorded sha256 first (:func:`flows.checkpoints.read_verified`)."""
    data, manifest = read_verified(Path(path), recorded_files)
    return {
        "deltas": load_tensors(data["deltas.safetensors"]),
        "state": EditState.from_state_dict(load_tensors(data["state.safetensors"])),
        "manifest": manifest,
    }


def load_checkpoint_into(model: nn.Module, base_hash: str, path: Path,
                         recorded_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Set the unedited ``model``'s edited weights to base + the checkpoint's deltas; returns its manifest.

    Refuses a checkpoint made from other base weights (compared by ``weights_hash``) and one
    whose files do not hash to what was recorded.
    """
    ckpt = read_checkpoint(path, recorded_files)
    man = ckpt["manifest"]
    if man["base_weights_hash"] != base_hash:
        raise ValueError(f"checkpoint {path} was made from base weights {man['base_weights_hash'][:12]}, "
                         f"not the loaded model's {base_hash[:12]}")
    materialise(model, edited_weights(model, list(ckpt["deltas"])), ckpt["deltas"])
    return man
