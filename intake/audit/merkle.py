"""A Merkle tree over the sealed audit entries, as Certificate Transparency builds it (RFC 9162 §2.1).

Leaves are ``SHA-256(0x00 || entry)`` and interior nodes ``SHA-256(0x01 || left || right)``; a
tree of ``n`` leaves splits at the largest power of two below ``n``. Anyone holding the entries
and a signed tree head (:mod:`intake.audit.archive`) can recompute the root, check that one entry
is in the tree (an *inclusion proof*), and check that a later tree extends an earlier one without
changing it (a *consistency proof*), with no secret at all. The proofs and their verifiers follow
RFC 9162 §2.1.3 and §2.1.4; the tests check them against the CT reference vectors.

:class:`Frontier` keeps only the roots of the perfect subtrees of the tree so far (``O(log n)``
hashes), so the broker extends the tree entry by entry without keeping every leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes (bottom-up, so a million leaves need no deep recursion)."""
    if not leaves:
        return EMPTY_ROOT
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``leaves`` (RFC 9162 §2.1.3.1)."""
    if not 0 <= index < len(leaves):
        raise ValueError("leaf index out of range")
    proof: list[bytes] = []
    lo, hi = 0, len(leaves)
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            proof.append(root(leaves[lo + k:hi]))
            hi = lo + k
        else:
            proof.append(root(leaves[lo:lo + k]))
            lo += k
    proof.reverse()
    return proof


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: whether ``leaf`` is leaf ``index`` of the tree of ``size`` with ``expected_root``."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def consistency_proof(first: int, leaves: Sequence[bytes]) -> list[bytes]:
    """The proof that the tree of ``leaves[:first]`` is a prefix of the tree of ``leaves``
    (RFC 9162 §2.1.4.1, SUBPROOF)."""
    n = len(leaves)
    if not 0 < first <= n:
        raise ValueError("sizes out of range")

    def sub(m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        size = hi - lo
        if m == size:
            return [] if complete else [root(leaves[lo:hi])]
        k = _split(size)
        if m <= k:
            return sub(m, lo, lo + k, complete) + [root(leaves[lo + k:hi])]
        return sub(m - k, lo + k, hi, False) + [root(leaves[lo:lo + k])]

    return sub(first, 0, n, True)


def verify_consistency(first: int, second: int, proof: Sequence[bytes], first_root: bytes,
                       second_root: bytes) -> bool:
    """RFC 9162 §2.1.4.2: whether the tree of ``second`` with ``second_root`` extends the tree of
    ``first`` with ``first_root``."""
    if not 0 < first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: the first tree is a node of the second
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


@dataclass
class Frontier:
    """The tree so far as the roots of its perfect subtrees, largest first: ``size`` leaves in
    ``O(log size)`` hashes. :meth:`root` is MTH over every leaf appended."""

    size: int = 0
    nodes: list[bytes] = field(default_factory=list)

    def append(self, leaf: bytes) -> None:
        self.nodes.append(leaf)
        self.size += 1
        n = self.size
        while not n & 1:  # merge equal-sized subtrees, as a binary counter carries
            right = self.nodes.pop()
            self.nodes[-1] = node_hash(self.nodes[-1], right)
            n >>= 1

    def root(self) -> bytes:
        if not self.nodes:
            return EMPTY_ROOT
        acc = self.nodes[-1]
        for node in reversed(self.nodes[:-1]):
            acc = node_hash(node, acc)
        return acc

    def as_json(self) -> dict[str, object]:
        return {"size": self.size, "nodes": [n.hex() for n in self.nodes]}

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> Frontier:
        nodes = [bytes.fromhex(str(n)) for n in raw["nodes"]]  # type: ignore[attr-defined]
        size = int(raw["size"])  # type: ignore[call-overload]
        if bin(size).count("1") != len(nodes) or any(len(n) != 32 for n in nodes):
            raise ValueError("malformed Merkle frontier")
        return cls(size, nodes)
