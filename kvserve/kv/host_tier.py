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

Preemption by swap takes slots out of the LRU altogether: `reserve(n)` hands a preempted request
n slots of its own (evicting LRU entries for them), which nothing else may use until `release`
gives them back. Released slots rejoin the free list only at the end of the step, because that
step's swap-in still reads them after its swap-outs have written other slots.

    every slot is exactly one of: free · an LRU entry · reserved · released this step
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
        self._reserved: set[int] = set()     # held by swapped-out requests
        self._released: list[int] = []       # given back this step; free at end_step
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

    def reserve(self, num_slots: int) -> list[int] | None:
        """`num_slots` slots for a request swapped out by preemption, evicting LRU entries as needed;
        None (changing nothing) when the unprotected free and LRU slots are too few."""
        available = len(self._free_slots) + sum(1 for slot in self._slot_by_hash.values()
                                                 if slot not in self._protected)
        if num_slots > available:
            return None
        while len(self._free_slots) < num_slots:
            self._evict_one()
        slots = [self._free_slots.pop() for _ in range(num_slots)]
        self._reserved.update(slots)
        return slots

    def release(self, slots: list[int]) -> None:
        """A swapped-out request came back in (or ended): its slots are free after this step."""
        for slot in slots:
            self._reserved.remove(slot)
        self._released.extend(slots)

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def end_step(self) -> None:
        self._protected.clear()
        self._free_slots.extend(self._released)
        self._released.clear()

    def clear(self) -> None:
        """Forget every cached entry (a flush); reserved slots stay with their requests."""
        self._slot_by_hash.clear()
        self._free_slots = [s for s in range(self.num_slots - 1, -1, -1)
                            if s not in self._reserved and s not in self._released]
        self._protected.clear()

    def check_integrity(self, reserved: set[int]) -> None:
        """Every slot is in exactly one place; `reserved` are the slots swapped requests hold."""
        places = [*self._free_slots, *self._slot_by_hash.values(), *self._reserved, *self._released]
        assert sorted(places) == list(range(self.num_slots)), "a host slot is lost or in two places"
        assert self._reserved == reserved, "host slots reserved != slots held by swapped-out requests"

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

    def reserve(self, num_slots: int) -> list[int] | None:
        return None

    @property
    def num_reserved(self) -> int:
        return 0

    def end_step(self) -> None:
        return None

    def clear(self) -> None:
        return None

    def check_integrity(self, reserved: set[int]) -> None:
        assert not reserved
