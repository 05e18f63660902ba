"""BlockPool: a fixed set of KV blocks, their ref counts, and the LRU queue of free blocks.

This is the only place ref counts change.

    ref_count > 0   block is in some request's block table (shared blocks count each holder)
    ref_count == 0  block is in the free queue, whether or not it still holds cached KV

Free queue (an ordered dict used as an LRU list):

    front (taken first)                                         back (taken last)
    [uncached blocks ...][cached blocks, least recently used ... most recently used]

Blocks without cached content go to the front: reusing them loses nothing. Cached blocks go to
the back when their last holder lets go; a caller frees a request's blocks tail-first, so the tail
of a finished request is evicted before its head (heads are the prefixes others share).
Taking a cached block from the queue for reuse evicts its content: `on_evict(block_id)` tells the
prefix cache to forget it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: Callable[[int], None] = lambda block_id: None):
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self._on_evict = on_evict
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((block_id, None) for block_id in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def free_queue(self) -> list[int]:
        """Free block ids, next-to-be-taken first (for tests and integrity checks)."""
        return list(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks from the front of the free queue, each with ref count 1."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._on_evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a holder to each block (a prefix-cache hit); a free block leaves the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def demote(self, block_id: int) -> None:
        """A free block lost its cached content: it moves to the front, to be reused first."""
        assert self._ref_counts[block_id] == 0, f"block {block_id} is held"
        self._free.move_to_end(block_id, last=False)

    def free(self, block_ids: Iterable[int], is_cached: Callable[[int], bool]) -> None:
        """Drop one holder from each block, in the given order; unheld blocks join the free queue."""
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"block {block_id} freed while free"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
                if not is_cached(block_id):
                    self._free.move_to_end(block_id, last=False)
