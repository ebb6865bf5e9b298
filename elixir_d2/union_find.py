"""Disjoint sets over 0..n-1: connected tumour runs on a KiTS19 slice (data/kits19.py) and linked
detections across slices (inference/grouping.py)."""

from __future__ import annotations

from typing import List

__all__ = ["UnionFind"]


class UnionFind:
    """Union-find with path halving; a union keeps the smaller of the two roots."""

    def __init__(self, n: int):
        self.parent: List[int] = list(range(n))

    def find(self, i: int) -> int:
        """The root of ``i``'s set."""
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        """Merge the sets of ``a`` and ``b``."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
