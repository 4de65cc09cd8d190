"""Small exact linear algebra shared by the methods: seeded generators and cheap SVDs.

A LoRA product or an aggregate of K of them has rank at most r or K r, far below d. Both SVDs
here exploit that bound so the server never pays for a dense d x d decomposition when it does
not have to (a full SVD of a 4096 x 4096 float64 matrix takes tens of seconds on two cores).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def stable_seed(text: str) -> int:
    """A 63-bit seed derived from ``text``, identical across processes and Python versions.

    Python's ``hash`` is salted per process, so it cannot seed anything clients must share.
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_generator(text: str) -> torch.Generator:
    """A CPU generator seeded by :func:`stable_seed`."""
    return torch.Generator().manual_seed(stable_seed(text))


def refactor_orthonormal(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Re-factor ``B @ A`` as ``U S`` times ``V^T``: same product, A with orthonormal rows.

    Exact because rank(B @ A) <= r: with A^T = Q R (thin QR), B @ A = (B R^T) Q^T, and the SVD of
    the small d_out x r matrix B R^T = U S W^T gives B @ A = (U S)(Q W)^T. Costs
    O((d_out + d_in) r^2) instead of a d_out x d_in SVD.

    Parameters
    ----------
    B
        d_out x r.
    A
        r x d_in, any rank (a rank-deficient A still yields orthonormal rows).

    Returns
    -------
    tuple
        ``(U S, V^T)``: d_out x r and r x d_in, singular values in decreasing order in the
        columns of the first.
    """
    r = A.shape[0]
    if r > min(B.shape[0], A.shape[1]):
        raise ValueError(
            f"rank {r} exceeds the layer's smaller side ({B.shape[0]} x {A.shape[1]}); "
            "an SVD re-factorisation cannot keep that rank"
        )
    q, rr = torch.linalg.qr(A.T)  # d_in x r, r x r
    u, s, wh = torch.linalg.svd(B @ rr.T, full_matrices=False)  # d_out x r, r, r x r
    return u * s, wh @ q.T  # d_out x r, r x d_in


def thin_svd(
    M: Tensor,
    rank_bound: int | None = None,
    *,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``M`` (d_out x d_in) limited to the first ``rank_bound`` components.

    When ``rank_bound`` is known to bound rank(M) and is small, the range of M is found from
    ``M @ Omega`` with a Gaussian d_in x rank_bound matrix (exact for rank(M) <= rank_bound,
    up to rounding), then the SVD of the small ``Q^T M`` is taken: O(d^2 rank_bound) instead of
    O(d^3). Otherwise a plain thin SVD.

    Returns
    -------
    tuple
        ``(U, S, Vh)``: d_out x q, q (decreasing), q x d_in with q = rank_bound on the fast
        path, min(d_out, d_in) otherwise.
    """
    k = min(M.shape)
    if rank_bound is None or 2 * rank_bound > k:
        u, s, vh = torch.linalg.svd(M, full_matrices=False)
        return u, s, vh
    if rank_bound < 1:
        raise ValueError(f"rank_bound must be positive, got {rank_bound}")
    g = seeded_generator(f"thin-svd:{seed}")
    omega = torch.randn(M.shape[1], rank_bound, generator=g, dtype=M.dtype)  # d_in x q
    q, _ = torch.linalg.qr(M @ omega)  # d_out x q, orthonormal columns spanning range(M)
    u_small, s, vh = torch.linalg.svd(q.T @ M, full_matrices=False)  # q x q, q, q x d_in
    return q @ u_small, s, vh
