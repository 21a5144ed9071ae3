"""EditState: what an editor carries from one batch to the next."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


def as_stored(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(t as a file stores it, whether that is its transpose)``: a 2-D transposed view (LAPACK's
    column-major inverse, a key matrix read as rows) is stored as its contiguous transpose, so
    loading gives back the same memory layout, and the BLAS products that follow round exactly
    as they did in the process that wrote it."""
    if t.dim() == 2 and not t.is_contiguous() and t.T.is_contiguous():
        return t.T.contiguous(), True
    return t.contiguous(), False


_KINDS = ("projector", "inverse")
# Written by states before the key cache was dropped: S = sum of K K^T was never read by a solve
# (the maintained inverses carry it), so it is skipped on load.
_DROPPED = ("key_cache",)


@dataclass(frozen=True)
class EditState:
    """Sequential-editing state. Immutable: editors return a new one.

    Attributes:
        layers: edited layers.
        projectors: layer -> (d_in, d_in) AlphaEdit null-space projector P (empty otherwise).
        inverses: layer -> (d_in, d_in) float64 inverse of the solve's system without the
            current batch (MEMIT: (lambda C + S)^-1; AlphaEdit: (P S + beta I)^-1, S = sum of the
            past keys' K K^T), kept up to date by Woodbury updates so each batch costs O(d^2 n),
            not O(d^3). S itself is not held: no solve reads it, and at 8B it would be 1.6 GB
            of float64 per layer.
        edit_count: requests written so far.
        skipped_count: requests NAS skipped as outliers so far.
        reference_norm: NAS reference norm a (None when NAS is off).
    """

    layers: tuple[int, ...]
    projectors: dict[int, torch.Tensor] = field(default_factory=dict)
    inverses: dict[int, torch.Tensor] = field(default_factory=dict)
    edit_count: int = 0
    skipped_count: int = 0
    reference_norm: float | None = None

    def advanced(self, edited: int, skipped: int, inverses: dict[int, torch.Tensor] | None = None) -> EditState:
        """A new state after a batch: the counts moved on and the layers' maintained inverses replaced."""
        return replace(
            self,
            inverses={**self.inverses, **(inverses or {})},
            edit_count=self.edit_count + edited,
            skipped_count=self.skipped_count + skipped,
        )

    def state_dict(self, projectors: bool = True) -> dict[str, torch.Tensor]:
        """Flat tensors only, ready for safetensors; without the projectors (rebuilt from the
        covariance) when ``projectors`` is False."""
        out: dict[str, torch.Tensor] = {
            "layers": torch.tensor(self.layers, dtype=torch.long),
            "edit_count": torch.tensor(self.edit_count, dtype=torch.long),
            "skipped_count": torch.tensor(self.skipped_count, dtype=torch.long),
        }
        if self.reference_norm is not None:
            out["reference_norm"] = torch.tensor(self.reference_norm, dtype=torch.float64)
        for kind, tensors in zip(_KINDS, (self.projectors if projectors else {}, self.inverses), strict=True):
            for layer, t in tensors.items():
                stored, flipped = as_stored(t)
                out[f"{kind}{'_t' if flipped else ''}.{layer}"] = stored  # _t: the transpose is stored
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> EditState:
        known = {"layers", "edit_count", "skipped_count", "reference_norm"}
        prefixes = tuple(f"{kind}{t}." for kind in (*_KINDS, *_DROPPED) for t in ("", "_t"))
        unknown = [k for k in sd if k not in known and not k.startswith(prefixes)]
        if unknown:
            raise ValueError(f"unknown EditState entries: {unknown}")

        def of(kind: str) -> dict[int, torch.Tensor]:
            plain = {int(k.split(".")[1]): v for k, v in sd.items() if k.startswith(f"{kind}.")}
            return {**plain, **{int(k.split(".")[1]): v.T for k, v in sd.items() if k.startswith(f"{kind}_t.")}}

        return cls(
            layers=tuple(int(x) for x in sd["layers"].tolist()),
            projectors=of("projector"),
            inverses=of("inverse"),
            edit_count=int(sd["edit_count"]),
            skipped_count=int(sd["skipped_count"]),
            reference_norm=float(sd["reference_norm"]) if "reference_norm" in sd else None,
        )
