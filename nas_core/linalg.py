"""The solves of the editors, in float64, with the cast back left to the caller.

Shapes: K (d_in, n) keys as columns, R (d_out, n) residuals, C (d_in, d_in) second
moment of preserved keys, S (d_in, d_in) sum of past K K^T.
"""

from __future__ import annotations

import torch

from nas_core.deltas import factor_product


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def ridge_solve(
    keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, mom2_weight: float,
    key_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """MEMIT: Delta = R K^T (lambda C + K K^T + S)^-1, returned (d_out, d_in) in float64."""
    k, r = _f64(keys), _f64(resid)
    a = mom2_weight * _f64(cov) + k @ k.T
    if key_cache is not None:
        a = a + _f64(key_cache)
    # A is symmetric positive definite; solve A X = K, then Delta = R X^T.
    x = torch.linalg.solve(a, k)  # (d_in, n)
    return r @ x.T


def nullspace_projector(cov: torch.Tensor, threshold: float, relative: float | None = None) -> torch.Tensor:
    """AlphaEdit: P = U_0 U_0^T over eigenvectors of C with eigenvalue below the cut (float64).

    Args:
        cov: (d_in, d_in) second moment C of the preserved keys.
        threshold: the absolute cut (AlphaEdit's 1e-2 for its models' statistics).
        relative: when given, the cut is ``relative * lambda_max(C)`` instead, which does
            not depend on the scale of the keys (a model whose C has no eigenvalue below
            an absolute cut gets no null space, and AlphaEdit then edits nothing).

    Returns:
        (d_in, d_in) projector onto the span of C's small-eigenvalue directions.
    """
    evals, evecs = torch.linalg.eigh(_f64(cov))
    cut = threshold if relative is None else relative * float(evals[-1])
    u0 = evecs[:, evals < cut]
    return u0 @ u0.T


def projected_solve(
    keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, l2: float,
    key_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """AlphaEdit: X = (P (K K^T + S) + beta I)^-1 P K R^T, Delta = X^T (d_out, d_in), float64."""
    k, r, p = _f64(keys), _f64(resid), _f64(projector)
    kk = k @ k.T
    if key_cache is not None:
        kk = kk + _f64(key_cache)
    eye = torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    x = torch.linalg.solve(p @ kk + l2 * eye, p @ k @ r.T)  # (d_in, d_out)
    return x.T


def rank_one_update(
    key: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, jitter: float = 0.0
) -> tuple[torch.Tensor, float]:
    """r-ROME's Delta (d_out, d_in) float64 and its denominator (:func:`rank_one_factors`)."""
    left, right, denom = rank_one_factors(key, resid, cov, jitter)
    return factor_product(left, right), denom


def rank_one_factors(
    key: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, jitter: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """r-ROME: Delta = r (C^-1 k / (k^T C^-1 k))^T with one consistent key k.

    Args:
        key: (d_in,) the prefix-averaged key, the same one used for W k.
        resid: (d_out,) the change the layer's output must make at k.
        jitter: ridge relative to C's mean diagonal, keeping C invertible.

    Returns:
        (left r (d_out, 1), right C^-1 k / denominator (d_in, 1), both float64, the denominator
        k^T C^-1 k, which must be > 0).
    """
    k, r, c = _f64(key), _f64(resid), _f64(cov)
    if jitter:
        c = c + jitter * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    cinv_k = torch.linalg.solve(c, k)
    denom = float(k @ cinv_k)
    if not denom > 0:
        raise ArithmeticError(f"r-ROME denominator k^T C^-1 k = {denom} is not positive")
    return r[:, None], (cinv_k / denom)[:, None], denom


def classic_rank_one_update(
    key: torch.Tensor, bare_key: torch.Tensor, bare_resid: torch.Tensor, cov: torch.Tensor, jitter: float = 0.0
) -> tuple[torch.Tensor, float]:
    """Classic ROME's Delta (d_out, d_in) float64 and its denominator (:func:`classic_rank_one_factors`)."""
    left, right, denom = classic_rank_one_factors(key, bare_key, bare_resid, cov, jitter)
    return factor_product(left, right), denom


def classic_rank_one_factors(
    key: torch.Tensor, bare_key: torch.Tensor, bare_resid: torch.Tensor, cov: torch.Tensor, jitter: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Classic ROME: Delta = r_k (C^-1 k* / (k^T C^-1 k*))^T, k* prefix-averaged, k unprefixed
    (factors as :func:`rank_one_factors`).

    Kept as a baseline for "The Fall of ROME": the denominator mixes two keys, so it can be
    tiny or negative, and the update is then huge. No positivity check, on purpose.

    Args:
        key: (d_in,) k*, the prefix-averaged key.
        bare_key: (d_in,) k, the key of the bare prompt.
        bare_resid: (d_out,) the change the layer's output must make at k.
    """
    k_star, k, r, c = _f64(key), _f64(bare_key), _f64(bare_resid), _f64(cov)
    if jitter:
        c = c + jitter * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    cinv_k_star = torch.linalg.solve(c, k_star)
    denom = float(k @ cinv_k_star)
    if denom == 0.0:
        raise ArithmeticError("classic ROME denominator k^T C^-1 k* is exactly 0")
    return r[:, None], (cinv_k_star / denom)[:, None], denom


def woodbury_solve(
    inverse: torch.Tensor, u: torch.Tensor, v: torch.Tensor, rhs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (A0 + U V^T) X = B given M = A0^-1, in O(d^2 n) instead of O(d^3).

    Sequential editing adds a rank-n term to the same d x d system every batch, so the
    editors keep M = A0^-1 in their state and update it here (Sherman-Morrison-Woodbury):
    (A0 + U V^T)^-1 = M - M U (I + V^T M U)^-1 V^T M.

    Args:
        inverse: (d, d) float64 M.
        u, v: (d, n) the rank-n update.
        rhs: (d, m) right-hand side B.

    Returns:
        (X (d, m), the new inverse (A0 + U V^T)^-1 (d, d)), both float64.
    """
    m = _f64(inverse)
    u, v, b = _f64(u), _f64(v), _f64(rhs)
    mu = m @ u  # (d, n)
    vtm = v.T @ m  # (n, d)
    small = torch.eye(u.shape[1], dtype=torch.float64, device=m.device) + v.T @ mu  # (n, n)
    new_inverse = m - mu @ torch.linalg.solve(small, vtm)
    return new_inverse @ b, new_inverse
