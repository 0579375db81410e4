"""The audit Merkle tree against the Certificate Transparency reference vectors (RFC 6962's
test tree, the same hashing as RFC 9162) and against a separate, straightforward recursive
implementation of the RFC's definitions for every size and proof up to 40 leaves."""

from __future__ import annotations

import hashlib

from intake.audit import merkle

# The CT reference inputs and roots for tree sizes 0..8, and its proof vectors (public data).
CT_INPUTS = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                        "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [  # (leaf index, tree size, audit path)
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_CONSISTENCY = [  # (first size, second size, proof)
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
LEAVES = [merkle.leaf_hash(d) for d in CT_INPUTS]


def reference_mth(leaves: list[bytes]) -> bytes:
    """RFC 9162's MTH, written straight from its definition (recursive)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + reference_mth(leaves[:k]) + reference_mth(leaves[k:])).digest()


def test_the_ct_reference_roots() -> None:
    for n in range(9):
        assert merkle.root(LEAVES[:n]).hex() == CT_ROOTS[n]
    frontier = merkle.Frontier()
    for n, leaf in enumerate(LEAVES, 1):
        frontier.append(leaf)
        assert frontier.root().hex() == CT_ROOTS[n]
        assert merkle.Frontier.from_json(frontier.as_json()).root() == frontier.root()


def test_the_ct_reference_proofs() -> None:
    for index, size, path in CT_INCLUSION:
        proof = merkle.inclusion_proof(index, LEAVES[:size])
        assert [p.hex() for p in proof] == path
        root = bytes.fromhex(CT_ROOTS[size])
        assert merkle.verify_inclusion(index, size, LEAVES[index], proof, root)
        assert not merkle.verify_inclusion(index, size, LEAVES[(index + 1) % size], proof, root)
        assert not merkle.verify_inclusion(index, size * 2, LEAVES[index], proof, root)  # one level short
    for first, second, path in CT_CONSISTENCY:
        proof = merkle.consistency_proof(first, LEAVES[:second])
        assert [p.hex() for p in proof] == path
        a, b = bytes.fromhex(CT_ROOTS[first]), bytes.fromhex(CT_ROOTS[second])
        assert merkle.verify_consistency(first, second, proof, a, b)
        assert not merkle.verify_consistency(first, second, proof, b, a)
        assert not merkle.verify_consistency(first, second, proof[:-1], a, b)


def test_every_size_and_proof_against_a_separate_implementation() -> None:
    leaves = [merkle.leaf_hash(bytes([i, i * 7 % 256])) for i in range(40)]
    roots = {n: reference_mth(leaves[:n]) for n in range(41)}
    for n in range(41):
        assert merkle.root(leaves[:n]) == roots[n]
    for n in range(1, 41):
        for i in range(n):
            proof = merkle.inclusion_proof(i, leaves[:n])
            assert merkle.verify_inclusion(i, n, leaves[i], proof, roots[n])
            assert not merkle.verify_inclusion(i, n, merkle.leaf_hash(b"forged"), proof, roots[n])
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(m, leaves[:n])
            assert merkle.verify_consistency(m, n, proof, roots[m], roots[n])
            if m < n:
                changed = leaves[: m - 1] + [merkle.leaf_hash(b"rewritten")]
                assert not merkle.verify_consistency(m, n, proof, reference_mth(changed), roots[n])
