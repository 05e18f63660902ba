"""Chained block hashes → cached blocks: match, insert, evict. Pure Python.

A full block's key chains its whole prefix:

    h0 = H(b"",  tokens[0:16],  extra_keys)        extra_keys: cache namespace (tenant / salt)
    h1 = H(h0,   tokens[16:32], ())
    h2 = H(h1,   tokens[32:48], ())

so equal keys mean equal token prefixes (and equal namespaces). Keys come from hashlib, so they
are stable across processes, unlike the builtin `hash`.

`PrefixCache` maps key ↔ block id one to one. It never touches ref counts: the block pool owns
those and calls `evict` when it reuses a cached block. `NoPrefixCache` is the null object used when
prefix caching is off.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Sequence


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> bytes:
    h = hashlib.sha256()
    h.update(parent_hash or b"\0" * 32)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


def cache_namespace(tenant: str | None, cache_salt: str | None) -> str | None:
    """The extra key of a request's first block: its tenant, narrowed by its own cache_salt."""
    if tenant is None and cache_salt is None:
        return None
    return f"{tenant or ''}\x00{cache_salt or ''}"


def chain_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                       cache_salt: str | None = None) -> list[bytes]:
    """Extends `hashes` (those of the leading full blocks already hashed) to every full block of
    `token_ids`, in place, and returns it: the engine's keys (the first block salted with the cache
    namespace, `cache_namespace(tenant, cache_salt)`), so that a router outside the engine computes
    the same ones."""
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else None
        extra = (cache_salt,) if i == 0 and cache_salt else ()
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra))
    return hashes


class PrefixCache:
    def __init__(self) -> None:
        self._block_by_hash: dict[bytes, int] = {}
        self._hash_by_block: dict[int, bytes] = {}

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_by_hash)

    def match(self, block_hashes: Sequence[bytes]) -> list[int]:
        """Block ids of the longest leading run of `block_hashes` that is cached."""
        block_ids = []
        for block_hash in block_hashes:
            block_id = self._block_by_hash.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def insert(self, block_id: int, block_hash: bytes) -> None:
        """Record that `block_id` holds the KV of `block_hash`. If another block already holds it
        (two requests computed the same prefix at once), the first stays and this one stays
        uncached."""
        if block_hash in self._block_by_hash or block_id in self._hash_by_block:
            return
        self._block_by_hash[block_hash] = block_id
        self._hash_by_block[block_id] = block_hash

    def evict(self, block_id: int) -> bool:
        """Forget what `block_id` holds. True if it held a cached prefix block."""
        block_hash = self._hash_by_block.pop(block_id, None)
        if block_hash is None:
            return False
        del self._block_by_hash[block_hash]
        return True

    def cached_block_ids(self) -> list[int]:
        return list(self._hash_by_block)

    def cached_hashes(self, limit: int) -> list[bytes]:
        """The `limit` block hashes cached most recently, newest first (what a scale-out replica
        reports to its router), without copying the rest."""
        return list(itertools.islice(reversed(self._block_by_hash), limit))

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_by_block

    def hash_of(self, block_id: int) -> bytes | None:
        return self._hash_by_block.get(block_id)

    def check_integrity(self) -> None:
        assert len(self._block_by_hash) == len(self._hash_by_block), "hash maps differ in size"
        for block_hash, block_id in self._block_by_hash.items():
            assert self._hash_by_block.get(block_id) == block_hash, f"block {block_id}: maps disagree"

    def clear(self) -> None:
        self._block_by_hash.clear()
        self._hash_by_block.clear()


class NoPrefixCache(PrefixCache):
    """Prefix caching disabled: nothing is ever matched or kept."""

    def match(self, block_hashes: Sequence[bytes]) -> list[int]:
        return []

    def insert(self, block_id: int, block_hash: bytes) -> None:
        return None
