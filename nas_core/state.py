"""EditState: what an editor carries from one batch to the next."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class EditState:
    """Sequential-editing state. Immutable: editors return a new one.

    Attributes:
        layers: edited layers.
        key_cache: layer -> (d_in, d_in) float64 S = sum of K K^T over all past edits.
        projectors: layer -> (d_in, d_in) AlphaEdit null-space projector P (empty otherwise).
        inverses: layer -> (d_in, d_in) float64 inverse of the solve's system without the
            current batch (MEMIT: (lambda C + S)^-1; AlphaEdit: (P S + beta I)^-1), kept up to
            date by Woodbury updates so each batch costs O(d^2 n), not O(d^3).
        edit_count: requests written so far.
        skipped_count: requests NAS skipped as outliers so far.
        reference_norm: NAS reference norm a (None when NAS is off).
    """

    layers: tuple[int, ...]
    key_cache: dict[int, torch.Tensor] = field(default_factory=dict)
    projectors: dict[int, torch.Tensor] = field(default_factory=dict)
    inverses: dict[int, torch.Tensor] = field(default_factory=dict)
    edit_count: int = 0
    skipped_count: int = 0
    reference_norm: float | None = None

    def with_keys(
        self,
        keys: dict[int, torch.Tensor],
        edited: int,
        skipped: int,
        inverses: dict[int, torch.Tensor] | None = None,
    ) -> EditState:
        """A new state with ``keys[layer]`` (d_in, n) added to the key cache."""
        cache = dict(self.key_cache)
        for layer, k in keys.items():
            kk = k.double() @ k.double().T
            cache[layer] = cache[layer] + kk if layer in cache else kk
        return replace(
            self,
            key_cache=cache,
            inverses={**self.inverses, **(inverses or {})},
            edit_count=self.edit_count + edited,
            skipped_count=self.skipped_count + skipped,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors only, ready for safetensors."""
        out: dict[str, torch.Tensor] = {
            "layers": torch.tensor(self.layers, dtype=torch.long),
            "edit_count": torch.tensor(self.edit_count, dtype=torch.long),
            "skipped_count": torch.tensor(self.skipped_count, dtype=torch.long),
        }
        if self.reference_norm is not None:
            out["reference_norm"] = torch.tensor(self.reference_norm, dtype=torch.float64)
        for layer, t in self.key_cache.items():
            out[f"key_cache.{layer}"] = t.contiguous()
        for layer, t in self.projectors.items():
            out[f"projector.{layer}"] = t.contiguous()
        for layer, t in self.inverses.items():
            out[f"inverse.{layer}"] = t.contiguous()
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> EditState:
        known = {"layers", "edit_count", "skipped_count", "reference_norm"}
        unknown = [k for k in sd if k not in known and not k.startswith(("key_cache.", "projector.", "inverse."))]
        if unknown:
            raise ValueError(f"unknown EditState entries: {unknown}")
        return cls(
            layers=tuple(int(x) for x in sd["layers"].tolist()),
            key_cache={int(k.split(".")[1]): v for k, v in sd.items() if k.startswith("key_cache.")},
            projectors={int(k.split(".")[1]): v for k, v in sd.items() if k.startswith("projector.")},
            inverses={int(k.split(".")[1]): v for k, v in sd.items() if k.startswith("inverse.")},
            edit_count=int(sd["edit_count"]),
            skipped_count=int(sd["skipped_count"]),
            reference_norm=float(sd["reference_norm"]) if "reference_norm" in sd else None,
        )
