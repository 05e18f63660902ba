"""The disk tier: a bounded third store, below the host tier, for blocks the host tier evicts.
Pure Python.

Bookkeeping only: which prefix blocks (by chained hash) have a file, least recently used first.
The runner owns the directory and does the file I/O the KV manager orders:

    host tier evicts an entry ──▶ store(hash) → True    host_to_disk:   host slot → file <hash hex>
    disk LRU evicts an entry  ──▶ on_evict(hash)        disk_drop:      file <hash hex> removed
    a request's prefix continues on disk ──▶ take(hash) disk_to_device: file → new device block

The books describe the directory as it will be once the step's orders have run. An entry that a
copy of the current step reads or writes (take, store) is protected from eviction until the
step's orders are handed to the runner, so no file is dropped before it is read or dropped in
the step that writes it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class DiskTier:
    def __init__(self, num_blocks: int, on_evict: Callable[[bytes], None]):
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self._on_evict = on_evict
        self._hashes: OrderedDict[bytes, None] = OrderedDict()   # LRU first
        self._protected: set[bytes] = set()
        self.num_evicted = 0

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._hashes

    def match(self, block_hashes: list[bytes]) -> list[bytes]:
        """The longest leading run of `block_hashes` held here."""
        run = []
        for block_hash in block_hashes:
            if block_hash not in self._hashes:
                break
            run.append(block_hash)
        return run

    def take(self, block_hash: bytes) -> None:
        """A hit: its file is read this step; protected and marked recently used."""
        self._hashes.move_to_end(block_hash)
        self._protected.add(block_hash)

    def store(self, block_hash: bytes) -> bool:
        """Make room for a block leaving the host tier, evicting the least recently used entry
        when full. True when the runner must write its file; False when it is already here
        (refreshed) or every entry is protected this step (the block is then simply dropped)."""
        if block_hash in self._hashes:
            self._hashes.move_to_end(block_hash)
            return False
        if len(self._hashes) >= self.num_blocks and not self._evict_one():
            return False
        self._hashes[block_hash] = None
        self._protected.add(block_hash)
        return True

    def end_step(self) -> None:
        self._protected.clear()

    def clear(self) -> list[bytes]:
        """Forget every entry; the hashes whose files the runner must remove."""
        dropped = list(self._hashes)
        self._hashes.clear()
        self._protected.clear()
        return dropped

    def _evict_one(self) -> bool:
        for block_hash in self._hashes:
            if block_hash not in self._protected:
                del self._hashes[block_hash]
                self.num_evicted += 1
                self._on_evict(block_hash)
                return True
        return False


class NoDiskTier(DiskTier):
    """No disk tier: nothing is kept, nothing is found."""

    def __init__(self) -> None:
        self.num_blocks = 0
        self.num_evicted = 0

    def __len__(self) -> int:
        return 0

    def __contains__(self, block_hash: bytes) -> bool:
        return False

    def match(self, block_hashes: list[bytes]) -> list[bytes]:
        return []

    def store(self, block_hash: bytes) -> bool:
        return False

    def end_step(self) -> None:
        return None

    def clear(self) -> list[bytes]:
        return []
