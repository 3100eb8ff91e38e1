"""Projectors for GaLore and FRUGAL as pure tensor functions: the projector *is* a tensor (or an index vector)
held in optimizer state, never an object, so checkpoints stay ``weights_only``-loadable.

GaLore (Zhao et al., arXiv 2403.03507, Alg. 1), ``std`` side rule for a gradient G of shape m x n::

    m >= n (right):  Q = Vh[:r]      (r x n)   G_low = G Q^T   (m x r)   back: U_low Q      (1)
    m <  n (left):   P = U[:, :r]    (m x r)   G_low = P^T G   (r x n)   back: P U_low      (2)
    full:            P, Q as above             G_low = P^T G Q^T (r x r) back: P U_low Q    (3)

with ``U, S, Vh = svd(G.float())`` cast back to G's dtype (matches the official ``galore_projector.py``).
FRUGAL (Zmushko et al., arXiv 2411.07837, §3) uses the same down/up maps (without ``scale``), random orthogonal
matrices, or coordinate subsets (columns / rows / RandK), plus whole-tensor ("blockwise") selection orders.

Randomness is reproducible from state alone: each refresh builds a CPU ``torch.Generator`` seeded with
``mix_seed(seed, refresh_index)`` where ``seed`` and ``refresh_index`` are int64 tensors in optimizer state; the draws
are then moved to the gradient's device, so CPU and CUDA select the same coordinates.
"""

from __future__ import annotations

import torch

GALORE_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
COORD_CHOICES = ("columns", "rows", "randk")
BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------------- seeds
def mix_seed(seed: int, index: int) -> int:
    """A well-spread 63-bit seed from (seed, index): splitmix64 finalizer over ``seed * golden + index``."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def generator(seed: int, index: int) -> torch.Generator:
    """CPU generator for refresh ``index`` of a stream identified by ``seed``."""
    return torch.Generator(device="cpu").manual_seed(mix_seed(seed, index))


# ------------------------------------------------------------------------------------------------ GaLore-style SVD
def galore_side(shape: torch.Size, proj_type: str) -> str:
    """Which side GaLore projects for a gradient of ``shape`` (official ``project``): 'left', 'right' or 'full'."""
    if proj_type not in GALORE_PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {GALORE_PROJ_TYPES}, got {proj_type!r}")
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


SVD_METHODS = ("full", "randomized")
OVERSAMPLE, POWER_ITERATIONS = 10, 2  # the randomized SVD's p and q (Halko et al. recommend p 5-10, q 1-2)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``y``'s columns (tall, full rank): CholeskyQR2 (Fukaya et al. 2014: two passes of
    Q = Y R^-1 with R from the Cholesky factor of Y^T Y), a few times faster than Householder QR for the tall, thin
    matrices of the range finder; Householder QR when the Gram matrix is not positive definite."""
    for _ in range(2):
        lower, info = torch.linalg.cholesky_ex(y.T @ y)
        if int(info) != 0:
            return torch.linalg.qr(y).Q
        y = torch.linalg.solve_triangular(lower.T, y, upper=True, left=False)
    return y


def randomized_left_vectors(a: torch.Tensor, rank: int, gen: torch.Generator) -> torch.Tensor:
    """The top-k left singular vectors of fp32 ``a`` (m x k, k = min(rank, m, n)), approximately: randomized
    subspace iteration (Halko, Martinsson & Tropp 2011, arXiv 0909.4061, Alg. 4.4: ``POWER_ITERATIONS`` steps,
    ``OVERSAMPLE`` extra columns, each basis orthonormalized), then the eigenvectors of the small Gram matrix B B^T,
    B = Q^T A (Alg. 5.1 with B's left singular vectors taken from B B^T). O(mn(k + p)) instead of the full SVD's
    O(mn min(m, n)). The test matrix is drawn from ``gen`` (a CPU generator) and moved to ``a``'s device, so a run
    draws the same subspace on CPU and CUDA and never touches the global RNG (dropout, data order)."""
    m, n = a.shape
    k = min(rank, m, n)
    width = min(k + OVERSAMPLE, m, n)
    q = _orthonormal(a @ torch.randn(n, width, generator=gen, dtype=torch.float32).to(a.device))
    for _ in range(POWER_ITERATIONS):
        q = _orthonormal(a @ _orthonormal(a.T @ q))
    b = q.T @ a
    _, vectors = torch.linalg.eigh(b @ b.T)  # ascending eigenvalues: the top k are the last columns
    return q @ vectors.flip(-1)[:, :k]


def svd_projector(g: torch.Tensor, rank: int, side: str, gen: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-``rank`` singular vectors of ``g`` (SVD in fp32, result in g's dtype): ``(ortho, ortho_right)``.

    'right' -> (Vh[:r], None); 'left' -> (U[:, :r], None); 'full' -> (U[:, :r], Vh[:r]).
    ``rank`` larger than min(m, n) is silently capped by the reduced SVD, as in the official code. With ``gen``,
    the vectors come from :func:`randomized_left_vectors` (an option, not the official method).
    """
    if gen is not None:  # only the side(s) asked for: U of g, and U of g^T for Vh
        a = g.float()
        u = randomized_left_vectors(a, rank, gen) if side != "right" else None
        vh = randomized_left_vectors(a.T, rank, gen).T if side != "left" else None
    else:
        u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    if side == "right":
        return vh[:rank].to(g.dtype).contiguous(), None
    if side == "left":
        return u[:, :rank].to(g.dtype).contiguous(), None
    return u[:, :rank].to(g.dtype).contiguous(), vh[:rank].to(g.dtype).contiguous()


def svd_scratch_bytes(shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Peak temporary bytes of :func:`svd_projector` on a gradient of ``shape`` and ``dtype`` (an upper bound).

    ``torch.linalg.svd(G.float(), full_matrices=False)`` on the CPU holds, at once: the fp32 copy of G (when G is
    not fp32), LAPACK's column-major copy of it (``gesdd`` overwrites its input), U (m x k), S and Vh (k x n), and
    ``gesdd``'s workspace: with k = min(m, n), K = max(m, n), about 5 k^2 values, plus a k x k triangular factor
    when K >= 11 k / 6 (``dgesdd`` then QR-factorizes first: its MNTHR and LWORK in LAPACK's documentation); 5 and
    7 k^2 are counted, and 1 MiB for the allocator. Measured (MKL 2024.2, 2 threads): 5632 x 2048 fp32 192 MB
    (this gives 227 MB), 2048 x 2048 108 MB (135 MB). The planner counts it on top of an update's state, since a
    refresh step allocates it while backward runs (``scratch_bytes`` of GaLore and FRUGAL).
    """
    m, n = shape
    k, big = min(m, n), max(m, n)
    widen = 4 * m * n if dtype != torch.float32 else 0
    workspace = (7 if 6 * big >= 11 * k else 5) * k * k
    return widen + 4 * m * n + 4 * (m * k + k + k * n) + 4 * workspace + (1 << 20)


def randomized_scratch_bytes(shape: tuple[int, int], rank: int, dtype: torch.dtype) -> int:
    """Peak temporary bytes of :func:`randomized_left_vectors` on a gradient of ``shape`` (either side): the fp32 copy
    (when not fp32), the test matrix, a few m x l and n x l bases and the l x n projection, l = rank + OVERSAMPLE."""
    m, n = shape
    width = min(rank + OVERSAMPLE, m, n)
    widen = 4 * m * n if dtype != torch.float32 else 0
    return widen + 4 * (3 * (m + n) * width + 3 * width * n + 3 * width * width) + (1 << 20)


def random_orthogonal(shape: tuple[int, int], gen: torch.Generator, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """A random matrix of ``shape`` with orthonormal rows (wide) or columns (tall).

    Same construction as ``torch.nn.init.orthogonal_`` (which FRUGAL's code calls with the global RNG): draw a
    standard normal matrix with ``gen`` (fp32, CPU), QR-factorize its tall orientation, fix signs by diag(R).
    """
    rows, cols = shape
    a = torch.randn(max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float32)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if rows < cols:
        q = q.t()
    return q.to(device=device, dtype=dtype).contiguous()


def project(g: torch.Tensor, ortho: torch.Tensor, side: str, ortho_right: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. (1)-(3), down direction."""
    if side == "right":
        return g @ ortho.t()
    if side == "left":
        return ortho.t() @ g
    return ortho.t() @ g @ ortho_right.t()


def project_up(low: torch.Tensor, ortho: torch.Tensor, side: str,
               ortho_right: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. (1)-(3), up direction, side given explicitly (FRUGAL's ``project_up``; no scale)."""
    if side == "right":
        return low @ ortho
    if side == "left":
        return ortho @ low
    return ortho @ low @ ortho_right


def project_back(low: torch.Tensor, ortho: torch.Tensor, proj_type: str, scale: float,
                 ortho_right: torch.Tensor | None = None) -> torch.Tensor:
    """GaLore's ``project_back``: the side is re-derived from the *low-rank* tensor's shape, then ``* scale``.

    Official rule (galore_projector.py ``project_back``): std -> right iff low.shape[0] >= low.shape[1];
    reverse_std -> left iff low.shape[0] <= low.shape[1]. Fix: for reverse_std with m < n and rank >= m the official
    rule picks 'left' for an m x m low tensor and raises a shape error; we take the side whose shapes match.
    """
    if proj_type in ("right", "left", "full"):
        side = proj_type
    else:
        rows, cols = low.shape
        if proj_type == "std":
            side = "right" if rows >= cols else "left"
        else:
            side = "left" if rows <= cols else "right"
        fits = ortho.shape[1] == rows if side == "left" else ortho.shape[0] == cols
        if not fits:
            side = "right" if side == "left" else "left"
    return project_up(low, ortho, side, ortho_right) * scale


# ----------------------------------------------------------------------------------------------- FRUGAL projectors
def frugal_side_rank(shape: torch.Size, density: float) -> tuple[str, int]:
    """FRUGAL's std side and rank (frugal/galore_projector.py): right with round(density*n) if m >= n, else left with
    round(density*m)."""
    m, n = shape
    return ("right", round(n * density)) if m >= n else ("left", round(m * density))


def coord_count(shape: torch.Size, density: float, choice: str) -> int:
    """How many coordinates a coordinate projector keeps: int(density * length), length = n, m or m*n."""
    m, n = shape
    length = {"columns": n, "rows": m, "randk": m * n}[choice]
    return int(length * density)


def coord_indices(shape: torch.Size, density: float, choice: str, gen: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """``randperm(length)[:int(length*density)]`` (frugal/coordinate_projector.py); randk indexes the flat tensor."""
    if choice not in COORD_CHOICES:
        raise ValueError(f"coordinate choice must be one of {COORD_CHOICES}, got {choice!r}")
    m, n = shape
    length = {"columns": n, "rows": m, "randk": m * n}[choice]
    return torch.randperm(length, generator=gen)[:coord_count(shape, density, choice)].to(device)


def coord_down(g: torch.Tensor, indices: torch.Tensor, choice: str) -> torch.Tensor:
    """Selected coordinates: g[:, idx] (m x k), g[idx] (k x n) or g.flatten()[idx] (k)."""
    if choice == "columns":
        return g[:, indices]
    if choice == "rows":
        return g[indices]
    return g.reshape(-1)[indices]


def coord_up(low: torch.Tensor, indices: torch.Tensor, choice: str, shape: torch.Size) -> torch.Tensor:
    """Scatter ``low`` into zeros of ``shape`` (the inverse placement of :func:`coord_down`)."""
    full = torch.zeros(shape, dtype=low.dtype, device=low.device)
    if choice == "columns":
        full[:, indices] = low
    elif choice == "rows":
        full[indices] = low
    else:
        full.view(-1)[indices] = low
    return full


def active_blocks(order: str, num_tensors: int, num_active: int, refresh_index: int,
                  gen: torch.Generator | None = None) -> list[int]:
    """Indices of the tensors FRUGAL's block variant makes state-full at refresh ``refresh_index`` (0-based).

    Closed forms of the author code's ``next_block_start`` walk (proj_optimizer_templates.py, BlockOptimizer):
    ascending starts at 0 and moves +num_active (mod N); descending starts at N-1 and moves -num_active;
    mirror walks the first half and activates each index together with its mirror N-1-i; random = randperm(N)[:k].
    """
    n, k, t = num_tensors, num_active, refresh_index
    if n == 0 or k == 0:
        return []
    if order == "random":
        return torch.randperm(n, generator=gen)[:k].tolist()
    if order == "ascending":
        start = (t * k) % n
        return [(start + j) % n for j in range(k)]
    if order == "descending":
        start = (n - 1 - t * k) % n
        return [(start - j) % n for j in range(k)]
    if order == "mirror":
        half = n // 2
        start = (t * (k // 2)) % half
        picks = [(start + j) % half for j in range(k // 2)]
        return [i for j in picks for i in (j, n - 1 - j)]
    raise ValueError(f"block_order must be one of {BLOCK_ORDERS}, got {order!r}")
