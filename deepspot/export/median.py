"""An export-friendly lower median over a small, fixed ensemble: a pruned sorting network of ``min`` and ``max``.

``torch.median(x, dim)`` has no ONNX translation in either torch exporter. The ensemble size ``E`` is a constant at
export time, so the median can be spelled as a comparator network instead: a sorting network for ``E`` inputs,
pruned backwards to the comparators whose outputs reach position ``(E - 1) // 2`` of the ascending order. A
comparator ``(i, j)`` writes ``min(x_i, x_j)`` to ``i`` and ``max(x_i, x_j)`` to ``j``; after pruning, many only
need one of the two. The graph is pure elementwise ``Min``/``Max`` (ONNX ``Min``/``Max``): no data-dependent shapes,
no TopK, exact (a comparator never rounds), and it runs on every execution provider.

Semantics, identical to ``torch.median(x, dim).values``:

- the **lower** median, the element at position ``(E - 1) // 2`` of the ascending sort; for even ``E`` it is *not*
  the mean of the two middle values;
- ties need no special care: a comparator network returns the value, and equal values are interchangeable;
- **NaN propagates**: the result is NaN wherever any member of the ensemble is NaN. ``torch.minimum`` /
  ``torch.maximum`` and ONNX ``Min`` / ``Max`` (checked on onnxruntime's CPU provider) return NaN if either input
  is NaN, and every input has a path through the network to the output (the median depends on every input), so a
  NaN anywhere reaches the result. Execution providers that implement ``Min``/``Max`` without NaN propagation
  (TensorRT does not promise it) may instead return a number where torch returns NaN; finite inputs are exact
  everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Known size-optimal sorting networks for small n (see Knuth, TAOCP vol. 3, 5.3.4, and Dobbelaere's list of smallest
# sorting networks), as lists of parallel layers. They are only candidates: `selection_network` keeps whichever
# candidate prunes to fewer ops, and the tests check every network exhaustively with the 0-1 principle.
_OPTIMAL_SORTING_NETWORKS: dict[int, list[list[tuple[int, int]]]] = {
    3: [[(0, 2)], [(0, 1)], [(1, 2)]],
    4: [[(0, 2), (1, 3)], [(0, 1), (2, 3)], [(1, 2)]],
    5: [[(0, 3), (1, 4)], [(0, 2), (1, 3)], [(0, 1), (2, 4)], [(1, 2), (3, 4)], [(2, 3)]],
    6: [[(0, 5), (1, 3), (2, 4)], [(1, 2), (3, 4)], [(0, 3), (2, 5)], [(0, 1), (2, 3), (4, 5)], [(1, 2), (3, 4)]],
    7: [
        [(0, 6), (2, 3), (4, 5)],
        [(0, 2), (1, 4), (3, 6)],
        [(0, 1), (2, 5), (3, 4)],
        [(1, 2), (4, 6)],
        [(2, 3), (4, 5)],
        [(1, 2), (3, 4), (5, 6)],
    ],
    8: [
        [(0, 2), (1, 3), (4, 6), (5, 7)],
        [(0, 4), (1, 5), (2, 6), (3, 7)],
        [(0, 1), (2, 3), (4, 5), (6, 7)],
        [(2, 4), (3, 5)],
        [(1, 4), (3, 6)],
        [(1, 2), (3, 4), (5, 6)],
    ],
    9: [
        [(0, 3), (1, 7), (2, 5), (4, 8)],
        [(0, 7), (2, 4), (3, 8), (5, 6)],
        [(0, 2), (1, 3), (4, 5), (7, 8)],
        [(1, 4), (3, 6), (5, 7)],
        [(0, 1), (2, 4), (3, 5), (6, 8)],
        [(2, 3), (4, 5), (6, 7)],
        [(1, 2), (3, 4), (5, 6)],
    ],
    10: [
        [(0, 8), (1, 9), (2, 7), (3, 5), (4, 6)],
        [(0, 2), (1, 4), (5, 8), (7, 9)],
        [(0, 3), (2, 4), (5, 7), (6, 9)],
        [(0, 1), (3, 6), (8, 9)],
        [(1, 5), (2, 3), (4, 8), (6, 7)],
        [(1, 2), (3, 5), (4, 6), (7, 8)],
        [(2, 3), (4, 5), (6, 7)],
        [(3, 4), (5, 6)],
    ],
}


@dataclass(frozen=True)
class Comparator:
    """One step of a pruned network: ``min`` of positions ``i`` and ``j`` goes to ``i``, ``max`` to ``j``.

    Attributes:
        i: Lower position.
        j: Upper position (``i < j``).
        need_min: Whether a later step (or the output) reads position ``i``.
        need_max: Whether a later step (or the output) reads position ``j``.
    """

    i: int
    j: int
    need_min: bool
    need_max: bool

    @property
    def ops(self) -> int:
        return int(self.need_min) + int(self.need_max)


def batcher_sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for any ``n``: the network for the next power of two, cut to ``n`` inputs.

    Cutting is valid because the missing inputs can be taken as ``+inf`` at the top positions: a comparator that
    touches one of them leaves the real value where it is, so it can be dropped.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return [(i, j) for i, j in pairs if j < n]


def sorting_network_candidates(n: int) -> list[list[tuple[int, int]]]:
    """Every sorting network for ``n`` inputs that :func:`selection_network` chooses from."""
    candidates = [batcher_sorting_network(n)]
    if n in _OPTIMAL_SORTING_NETWORKS:
        candidates.append([pair for layer in _OPTIMAL_SORTING_NETWORKS[n] for pair in layer])
    return candidates


def prune(network: Sequence[tuple[int, int]], position: int) -> list[Comparator]:
    """Keep only the comparators that can influence ``position`` of the output, and mark which halves are read.

    Walks the network backwards with the set of positions still read later: a comparator none of whose outputs is
    read is dropped; a kept comparator reads both of its inputs.
    """
    needed = {position}
    kept = []
    for i, j in reversed(network):
        need_min, need_max = i in needed, j in needed
        if need_min or need_max:
            kept.append(Comparator(i, j, need_min, need_max))
            needed |= {i, j}
    return kept[::-1]


@functools.cache
def selection_network(n: int, position: int | None = None) -> tuple[Comparator, ...]:
    """The cheapest pruned network (fewest ``min``/``max`` ops) that puts the ``position``-th smallest at ``position``.

    Args:
        n: Number of inputs (the ensemble size).
        position: Order statistic to select; the lower median ``(n - 1) // 2`` by default.
    """
    if n < 1:
        raise ValueError(f"a median needs at least one value, got n={n}")
    position = (n - 1) // 2 if position is None else position
    if not 0 <= position < n:
        raise ValueError(f"position {position} out of range for n={n}")
    best: list[Comparator] | None = None
    for network in sorting_network_candidates(n):  # a plain loop, not min(key=): torch.compile traces it unbroken
        pruned = prune(network, position)
        if best is None or sum(c.ops for c in pruned) < sum(c.ops for c in best):
            best = pruned
    return tuple(best)


def network_ops(n: int) -> int:
    """Number of elementwise ``Min``/``Max`` ops in the lower-median network for ``n`` inputs."""
    return sum(c.ops for c in selection_network(n))


#: The lower-median networks built so far, by ensemble size: a plain dict, which ``torch.compile`` reads as a
#: constant (it traces through ``functools.cache`` wrappers with a warning, rebuilding the network).
_NETWORKS: dict[int, tuple[Comparator, ...]] = {}


def median_network(n: int) -> tuple[Comparator, ...]:
    """The lower-median network for ``n`` inputs; call it when a module is built, so that a compiled forward finds it
    made."""
    if n not in _NETWORKS:
        _NETWORKS[n] = selection_network(n)
    return _NETWORKS[n]


def lower_median_of(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The elementwise lower median of ``E`` same-shaped tensors, with ``torch.median``'s semantics (see module doc).

    Exports to ONNX as ``Min``/``Max`` ops only.
    """
    values = list(values)
    network = _NETWORKS.get(len(values)) or median_network(len(values))
    for c in network:
        lo = torch.minimum(values[c.i], values[c.j]) if c.need_min else None
        hi = torch.maximum(values[c.i], values[c.j]) if c.need_max else None
        # A half that no later step reads is not computed; its slot keeps a stale value that is never used.
        if lo is not None:
            values[c.i] = lo
        if hi is not None:
            values[c.j] = hi
    return values[(len(values) - 1) // 2]


def lower_median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Drop-in for ``torch.median(x, dim).values`` that exports to ONNX (the size of ``dim`` must be static)."""
    return lower_median_of(torch.unbind(x, dim=dim))
