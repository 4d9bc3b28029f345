"""Hadamard matrices of orders 2^k * 12^a * 20^b (Sylvester and Paley I constructions, Kronecker products).

QuaRot needs Hadamard rotations of the hidden size (SmolLM2: 576 = 12 * 12 * 4), the MLP width (1536 = 12 * 128)
and the head dimension (64).
"""

from __future__ import annotations

import torch

_PALEY_PRIMES = {12: 11, 20: 19}  # order q + 1 for primes q = 3 mod 4


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = lambda a: 0 if a % q == 0 else (1 if a % q in residues else -1)  # noqa: E731
    jacobsthal = torch.tensor([[chi(i - j) for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor:
    """An n x n matrix H with entries +-1 and H H^T = n I (float64); ValueError if n is not 2^k 12^a 20^b."""
    factors, m = [], n
    for order in (20, 12):
        while m % order == 0:
            factors.append(order)
            m //= order
    if m & (m - 1):
        raise ValueError(f"no Hadamard construction for order {n}: supported orders are 2^k * 12^a * 20^b")
    h = torch.ones(1, 1, dtype=torch.float64)
    for order in factors:
        h = torch.kron(h, _paley(_PALEY_PRIMES[order]))
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h, sylvester)
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)):
        raise AssertionError(f"Hadamard construction of order {n} failed its check")
    return h


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal n x n randomized Hadamard matrix diag(+-1) H / sqrt(n) (float64), as QuaRot uses."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n) / n**0.5
