"""The host tier: a bounded second store for KV blocks evicted from the main pool. Pure Python.

Bookkeeping only: which prefix block (by chained hash) sits in which host slot, least recently
used first. The runner owns the host tensors and performs the copies the KV manager asks for:

    main pool evicts a cached block ──▶ store(hash) → slot     swap-out: device block → host slot
    a request's prefix continues in the host tier ──▶ slot     swap-in:  host slot → new device block

    host tier full ──▶ the LRU entry goes to `on_evict(hash, slot)` (the disk tier, if any)

Both copies of one step run before that step's forward pass, swap-outs first, so a block evicted
and refilled in the same step is read before it is overwritten. A slot that a copy of the
current step reads (swap-in) or writes (swap-out) is protected from reuse until the step's
copies are handed to the runner: an evicted slot therefore still holds what it held before the
step, which is what an `on_evict` copy (run first, see SwapPlan) reads. A step that evicts more
blocks than the tier has unprotected slots drops the excess, so size the tier well above one
step's worth of blocks (max_num_batched_tokens / block_size).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class HostTier:
    def __init__(self, num_slots: int, on_evict: Callable[[bytes, int], None] = lambda block_hash, slot: None):
        assert num_slots > 0
        self.num_slots = num_slots
        self._on_evict = on_evict
        self._slot_by_hash: OrderedDict[bytes, int] = OrderedDict()   # LRU first
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._protected: set[int] = set()
        self.num_evicted = 0

    def __len__(self) -> int:
        return len(self._slot_by_hash)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._slot_by_hash

    def match(self, block_hashes: list[bytes]) -> list[int]:
        """Slots of the longest leading run of `block_hashes` held here."""
        slots = []
        for block_hash in block_hashes:
            slot = self._slot_by_hash.get(block_hash)
            if slot is None:
                break
            slots.append(slot)
        return slots

    def take(self, block_hash: bytes) -> int:
        """A hit: the slot to copy back from, protected for this step and marked recently used."""
        slot = self._slot_by_hash[block_hash]
        self._slot_by_hash.move_to_end(block_hash)
        self._protected.add(slot)
        return slot

    def store(self, block_hash: bytes) -> int | None:
        """A slot for a block leaving the main pool, evicting the least recently used entry when
        full; None when every slot is protected this step (the block is then simply dropped)."""
        if block_hash in self._slot_by_hash:           # already here (copied back earlier): refresh
            self._slot_by_hash.move_to_end(block_hash)
            return None
        if not self._free_slots and not self._evict_one():
            return None
        slot = self._free_slots.pop()
        self._slot_by_hash[block_hash] = slot
        self._protected.add(slot)
        return slot

    def end_step(self) -> None:
        self._protected.clear()

    def clear(self) -> None:
        self._slot_by_hash.clear()
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self._protected.clear()

    def _evict_one(self) -> bool:
        for block_hash, slot in self._slot_by_hash.items():
            if slot not in self._protected:
                del self._slot_by_hash[block_hash]
                self._free_slots.append(slot)
                self.num_evicted += 1
                self._on_evict(block_hash, slot)
                return True
        return False


class NoHostTier(HostTier):
    """No host tier: nothing is kept, nothing is found."""

    def __init__(self) -> None:
        self.num_slots = 0
        self.num_evicted = 0

    def __len__(self) -> int:
        return 0

    def __contains__(self, block_hash: bytes) -> bool:
        return False

    def match(self, block_hashes: list[bytes]) -> list[int]:
        return []

    def store(self, block_hash: bytes) -> int | None:
        return None

    def end_step(self) -> None:
        return None

    def clear(self) -> None:
        return None
