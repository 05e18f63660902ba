"""KVCacheManager: the only memory API the scheduler sees. Pure Python.

It owns each request's block table (a list of block ids, one per `block_size` tokens) and keeps
the block pool and the prefix cache in step:

    request tokens   [t0 .. t15][t16 .. t31][t32 .. t40 ......]
    block table      [    7    ][    3     ][    12            ]   12 is partly filled
    block hashes     [   h0    ][    h1    ]                       full blocks only

`match` finds cached blocks for a waiting request; `allocate_slots` makes room for the tokens a
step will compute; `cache_full_blocks` publishes blocks once their KV is computed; `free` gives a
request's blocks back. Blocks evicted from the pool move down the tiers by hash and come back on a
hit (see SwapPlan): pool ──▶ host tier (host_tier.py) ──▶ disk tier (disk_tier.py) ──▶ dropped.
`pin` keeps a computed prefix in the pool for a TTL that every hit renews
(see pins.py); `expire_pins` lets lapsed ones go back to plain LRU caching.

Preemption by swap: `swap_out` copies a running request's blocks to host slots of its own and
frees them; `swap_in` gives it fresh blocks and copies them back, so it resumes where it stopped
instead of being recomputed. Both are copy orders in the step's SwapPlan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.disk_tier import DiskTier, NoDiskTier
from kvserve.kv.host_tier import HostTier, NoHostTier
from kvserve.kv.pins import Pin, PinTable
from kvserve.kv.prefix_cache import NoPrefixCache, PrefixCache, chain_block_hashes
from kvserve.request import Request


@dataclass(frozen=True)
class CacheHit:
    """A waiting request's cached prefix: blocks still in the main pool, then blocks that
    continue it from the host tier, then from the disk tier (both copied back into fresh blocks
    when admitted)."""

    device_block_ids: list[int]
    host_hashes: list[bytes]
    disk_hashes: list[bytes] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.device_block_ids) + len(self.host_hashes) + len(self.disk_hashes)


NO_HIT = CacheHit([], [])


@dataclass(frozen=True)
class SwapPlan:
    """Copies the runner makes before a step's forward pass, in this order:

        1. disk_drop        remove files of entries the disk tier evicted (or flushed)
        2. host_to_disk     write host slots the host tier evicted to files (before 3 reuses them)
        3. swap_out         device blocks the pool evicted → host slots (before 4 reuses them)
        4. swap_in, disk_to_device   hits → fresh device blocks
        5. the forward pass overwrites the reused device blocks

    Files are named by the block's chained hash in hex. Drops run before writes, so a hash
    dropped and written again in one step ends up present; the books never write and drop
    one hash in the same step (see disk_tier.py), nor reuse a host slot read or written by
    another copy of the step (see host_tier.py).
    """

    swap_out: tuple[tuple[int, int], ...] = ()          # (device block, host slot)
    swap_in: tuple[tuple[int, int], ...] = ()           # (host slot, device block)
    host_to_disk: tuple[tuple[int, str], ...] = ()      # (host slot, hash hex)
    disk_to_device: tuple[tuple[str, int], ...] = ()    # (hash hex, device block)
    disk_drop: tuple[str, ...] = ()                     # hash hex

    @property
    def is_empty(self) -> bool:
        return not (self.swap_out or self.swap_in or self.host_to_disk or self.disk_to_device or self.disk_drop)


@dataclass(frozen=True)
class KVCacheStats:
    num_blocks: int
    num_used_blocks: int      # held by at least one request
    num_cached_blocks: int    # hold reusable prefix KV (used or free)
    num_free_blocks: int      # unheld (cached ones included: they are reusable on demand)
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_pinned_blocks: int = 0
    num_pins: int = 0
    pins_expired: int = 0          # pins whose TTL ran out without a hit (since start)
    pins_released_for_budget: int = 0
    blocks_evicted_lru: int = 0    # cached blocks reused for new content (since start)
    blocks_evicted_flush: int = 0  # cached blocks dropped by an explicit flush (since start)
    num_host_slots: int = 0
    num_host_blocks: int = 0       # blocks held in the host tier now
    host_hit_blocks: int = 0       # blocks copied back from the host tier (since start)
    blocks_evicted_host: int = 0   # host-tier entries dropped to make room (since start)
    disk_capacity_blocks: int = 0
    num_disk_blocks: int = 0       # blocks held in the disk tier now
    disk_hit_blocks: int = 0       # blocks copied back from the disk tier (since start)
    blocks_evicted_disk: int = 0   # disk-tier files dropped to make room (since start)
    num_swapped_requests: int = 0  # preempted requests whose blocks wait in the host tier now
    blocks_swapped_out: int = 0    # blocks copied out by preemption (since start)

    @property
    def usage(self) -> float:
        """Used share of the pool; 0 for a pool of no blocks (the summed stats of replicas that have
        not reported yet: /metrics must not fail then)."""
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, *,
                 pin_budget_fraction: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 num_host_blocks: int = 0, num_disk_blocks: int = 0):
        """`clock` (seconds) is injectable so TTL expiry is testable without sleeping. The disk
        tier holds what the host tier evicts, so it exists only below a host tier."""
        assert 0.0 <= pin_budget_fraction <= 1.0
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.clock = clock
        self.prefix_cache: PrefixCache = PrefixCache() if enable_prefix_caching else NoPrefixCache()
        self.pool = BlockPool(num_blocks, on_evict=self._on_reuse)
        self.pins = PinTable(int(num_blocks * pin_budget_fraction))
        self._pins_expired = 0
        self._pins_released_for_budget = 0
        self._evicted_lru = 0
        self._evicted_flush = 0
        # Without prefix caching the host tier stores no evicted prefixes, only swapped-out requests.
        self.host = HostTier(num_host_blocks, on_evict=self._on_host_evict) if num_host_blocks else NoHostTier()
        self.disk = (DiskTier(num_disk_blocks, on_evict=self._on_disk_evict)
                     if num_disk_blocks and self.host.num_slots else NoDiskTier())
        self._swap_out: list[tuple[int, int]] = []
        self._swap_in: list[tuple[int, int]] = []
        self._host_to_disk: list[tuple[int, str]] = []
        self._disk_to_device: list[tuple[str, int]] = []
        self._disk_drop: list[str] = []
        self._host_hits = 0
        self._disk_hits = 0
        self._block_ids: dict[str, list[int]] = {}
        self._swapped: dict[str, list[int]] = {}   # request id → its host slots, block by block
        self._blocks_swapped_out = 0
        self._num_published: dict[str, int] = {}   # leading blocks already offered to the cache
        self._queried_tokens = 0
        self._hit_tokens = 0

    # ---- queries ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self._block_ids.get(request_id, [])

    def stats(self) -> KVCacheStats:
        num_free = self.pool.num_free_blocks
        return KVCacheStats(self.num_blocks, self.num_blocks - num_free, self.prefix_cache.num_cached_blocks,
                            num_free, self._queried_tokens, self._hit_tokens, self.pins.num_pinned_blocks,
                            len(self.pins), self._pins_expired, self._pins_released_for_budget,
                            self._evicted_lru, self._evicted_flush, self.host.num_slots, len(self.host),
                            self._host_hits, self.host.num_evicted,
                            num_swapped_requests=len(self._swapped), blocks_swapped_out=self._blocks_swapped_out,
                            disk_capacity_blocks=self.disk.num_blocks, num_disk_blocks=len(self.disk),
                            disk_hit_blocks=self._disk_hits, blocks_evicted_disk=self.disk.num_evicted)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_sole_blocks(self, request: Request) -> int:
        """Blocks that only this request holds: what freeing it would return to the pool."""
        return sum(1 for block_id in self.block_ids(request.request_id) if self.pool.ref_count(block_id) == 1)

    # ---- verbs -------------------------------------------------------------------------------
    def match(self, request: Request) -> CacheHit:
        """The longest cached prefix of `request`: main-pool blocks, then host-tier ones, then
        disk-tier ones.

        At least one token is always left to compute: the model must run on the last token to
        produce logits for the next one.
        """
        self._update_block_hashes(request)
        hashes = request.block_hashes[:(request.num_tokens - 1) // self.block_size]
        device = self.prefix_cache.match(hashes)
        rest = hashes[len(device):]
        host = rest[:len(self.host.match(rest))]
        return CacheHit(device, host, self.disk.match(rest[len(host):]))

    def allocate_slots(self, request: Request, num_new_tokens: int, hit: CacheHit = NO_HIT) -> bool:
        """Make room for `num_new_tokens` more tokens after the request's computed (and newly
        matched cached) tokens. All or nothing: returns False, changing nothing, when the pool
        cannot supply the blocks. Host- and disk-tier hits get fresh blocks and a copy order."""
        held = self._block_ids.setdefault(request.request_id, [])
        cached_block_ids = hit.device_block_ids
        assert not (held and hit.num_blocks), "cached blocks are matched only at admission"
        num_tokens = request.num_computed_tokens + hit.num_blocks * self.block_size + num_new_tokens
        num_needed = self.blocks_for(num_tokens) - len(held) - len(cached_block_ids)
        # Matched blocks that sit in the free queue are about to leave it.
        num_matched_free = sum(1 for b in cached_block_ids if self.pool.ref_count(b) == 0)
        if num_needed > self.pool.num_free_blocks - num_matched_free:
            if not held:
                del self._block_ids[request.request_id]
            return False
        if not held:   # admission: count the lookup once, when it takes effect; hits renew pins
            self._queried_tokens += request.num_tokens
            self._hit_tokens += hit.num_blocks * self.block_size
            self.pins.refresh(request.block_hashes[:hit.num_blocks], self.clock())
        self.pool.touch(cached_block_ids)   # before allocating, so allocation cannot evict them
        held.extend(cached_block_ids)
        host_slots = [self.host.take(h) for h in hit.host_hashes]   # protected before any swap-out
        for block_hash in hit.disk_hashes:                          # ... and before any disk drop
            self.disk.take(block_hash)
        if num_needed > 0:
            held.extend(self.pool.allocate(num_needed))
        start = len(cached_block_ids)
        for i, (slot, block_hash) in enumerate(zip(host_slots, hit.host_hashes), start=start):
            self._swap_in.append((slot, held[i]))
            self.prefix_cache.insert(held[i], block_hash)   # valid once swapped in, before the forward pass
        for i, block_hash in enumerate(hit.disk_hashes, start=start + len(host_slots)):
            self._disk_to_device.append((block_hash.hex(), held[i]))
            self.prefix_cache.insert(held[i], block_hash)   # likewise, once read back
        self._host_hits += len(host_slots)
        self._disk_hits += len(hit.disk_hashes)
        return True

    def take_swaps(self) -> SwapPlan:
        """The copies this step needs, handed to the runner once per schedule."""
        plan = SwapPlan(tuple(self._swap_out), tuple(self._swap_in), tuple(self._host_to_disk),
                        tuple(self._disk_to_device), tuple(self._disk_drop))
        for orders in (self._swap_out, self._swap_in, self._host_to_disk, self._disk_to_device, self._disk_drop):
            orders.clear()
        self.host.end_step()
        self.disk.end_step()
        return plan

    def cache_full_blocks(self, request: Request) -> None:
        """Publish every block whose tokens are all computed now."""
        block_ids = self._block_ids[request.request_id]
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_published.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request)
        for i in range(start, num_full):
            self.prefix_cache.insert(block_ids[i], request.block_hashes[i])
        self._num_published[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Give all of the request's blocks back, tail first (see BlockPool), and its host slots if
        it was swapped out."""
        block_ids = self._block_ids.pop(request.request_id, [])
        self._num_published.pop(request.request_id, None)
        self.pool.free(reversed(block_ids), self.prefix_cache.is_cached)
        slots = self._swapped.pop(request.request_id, None)
        if slots is not None:
            self.host.release(slots)

    # ---- preemption by swap -----------------------------------------------------------------------
    def is_swapped(self, request: Request) -> bool:
        return request.request_id in self._swapped

    def swap_out(self, request: Request) -> bool:
        """Copy the request's blocks to host slots reserved for it and free them. False (nothing
        changed) when the host tier cannot hold them; the caller then recomputes instead."""
        block_ids = self._block_ids.get(request.request_id, [])
        if not block_ids:
            return False
        slots = self.host.reserve(len(block_ids))
        if slots is None:
            return False
        self._swap_out.extend(zip(block_ids, slots))
        self.free(request)
        self._swapped[request.request_id] = slots
        self._blocks_swapped_out += len(slots)
        return True

    def swap_in(self, request: Request, num_new_tokens: int) -> bool:
        """Fresh blocks for a swapped-out request's computed tokens plus `num_new_tokens`, the
        computed ones copied back from its host slots. False (nothing changed) when the pool is short."""
        slots = self._swapped[request.request_id]
        num_needed = self.blocks_for(request.num_computed_tokens + num_new_tokens)
        if num_needed > self.pool.num_free_blocks:
            return False
        block_ids = self.pool.allocate(num_needed)
        self._block_ids[request.request_id] = block_ids
        self._swap_in.extend(zip(slots, block_ids))
        del self._swapped[request.request_id]
        self.host.release(slots)
        return True

    def pin(self, request: Request, num_tokens: int, ttl_s: float) -> int:
        """Pin the full blocks among the request's first `num_tokens` tokens for `ttl_s` seconds
        (renewed by every hit). They must be computed. Returns the length of the prefix newly
        pinned (whole blocks from token 0): 0 when
        nothing fits in a whole block, when the prefix is already pinned (its TTL is renewed and
        lengthened if asked), or when the pin budget cannot hold it (never an error)."""
        num_blocks = min(num_tokens, request.num_computed_tokens) // self.block_size
        if num_blocks == 0:
            return 0
        self._update_block_hashes(request)
        key = request.block_hashes[num_blocks - 1]
        now = self.clock()
        existing = self.pins.get(key)
        if existing is not None:
            existing.ttl_s = max(existing.ttl_s, ttl_s)
            self.pins.refresh([key], now)
            return 0
        block_ids = self.prefix_cache.match(request.block_hashes[:num_blocks])
        if len(block_ids) < num_blocks:   # prefix caching off, or not published
            return 0
        self.pool.touch(block_ids)
        self.pins.add(Pin(key, tuple(block_ids), ttl_s, now + ttl_s))
        released = self.pins.pop_over_budget()
        self._pins_released_for_budget += len(released)
        for pin in released:
            self._unpin(pin)
        return 0 if self.pins.get(key) is None else num_blocks * self.block_size

    def expire_pins(self) -> int:
        """Release pins whose TTL ran out; their blocks stay cached, as plain LRU entries."""
        expired = self.pins.pop_expired(self.clock())
        self._pins_expired += len(expired)
        for pin in expired:
            self._unpin(pin)
        return len(expired)

    def release_oldest_pin(self) -> bool:
        """Under memory pressure with nothing running: pins must not starve every request."""
        pin = self.pins.pop_oldest()
        if pin is None:
            return False
        self._pins_released_for_budget += 1
        self._unpin(pin)
        return True

    def release_all_pins(self) -> None:
        for pin in self.pins.pop_all():
            self._unpin(pin)

    def pinned_prefixes(self) -> list[dict]:
        """Pins as {hash, num_tokens, ttl_s, ttl_left_s}; the hash names the prefix, never its text."""
        now = self.clock()
        return [{"hash": pin.key.hex()[:16], "num_tokens": pin.num_blocks * self.block_size, "ttl_s": pin.ttl_s,
                 "ttl_left_s": round(max(0.0, pin.expires_at - now), 3)} for pin in self.pins]

    def flush(self, include_pinned: bool = False) -> int:
        """Drop every cached block nobody holds (after releasing all pins, if asked). Blocks in
        use keep their entries: they are live KV. The host and disk tiers are emptied (the disk
        files are removed with the next step's copies). Returns the blocks dropped."""
        if include_pinned:
            self.release_all_pins()
        dropped = 0
        for block_id in self.prefix_cache.cached_block_ids():
            if self.pool.ref_count(block_id) == 0:
                self.prefix_cache.evict(block_id)
                self.pool.demote(block_id)
                dropped += 1
        self._evicted_flush += dropped
        self.host.clear()
        self._disk_drop.extend(h.hex() for h in self.disk.clear())
        return dropped

    def _on_reuse(self, block_id: int) -> None:
        """The pool reuses a free block: a cached one moves to the host tier, if there is one."""
        block_hash = self.prefix_cache.hash_of(block_id)
        if block_hash is None or not self.prefix_cache.evict(block_id):
            return
        self._evicted_lru += 1
        slot = self.host.store(block_hash)
        if slot is not None:
            self._swap_out.append((block_id, slot))

    def _on_host_evict(self, block_hash: bytes, slot: int) -> None:
        """The host tier reuses a slot: its block moves to the disk tier, if there is one."""
        if self.disk.store(block_hash):
            self._host_to_disk.append((slot, block_hash.hex()))

    def _on_disk_evict(self, block_hash: bytes) -> None:
        self._disk_drop.append(block_hash.hex())

    def _unpin(self, pin: Pin) -> None:
        self.pool.free(reversed(pin.block_ids), self.prefix_cache.is_cached)

    # ---- internals --------------------------------------------------------------------------
    def _update_block_hashes(self, request: Request) -> None:
        chain_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt)

    def check_integrity(self) -> None:
        """Verify, from scratch, every ref count, the free queue and the host slots. Raises AssertionError."""
        assert not set(self._swapped) & set(self._block_ids), "a swapped-out request holds pool blocks"
        self.host.check_integrity({slot for slots in self._swapped.values() for slot in slots})
        expected = [0] * self.num_blocks
        for block_ids in self._block_ids.values():
            assert len(set(block_ids)) == len(block_ids), f"a block table repeats a block: {block_ids}"
            for block_id in block_ids:
                expected[block_id] += 1
        for block_id, num_pins in self.pins.holders().items():
            expected[block_id] += num_pins
            assert self.prefix_cache.is_cached(block_id), f"pinned block {block_id} is not cached"
        for block_id, count in enumerate(expected):
            actual = self.pool.ref_count(block_id)
            assert actual == count, f"block {block_id}: ref count {actual}, held by {count} requests and pins"
        free = self.pool.free_queue()
        assert len(set(free)) == len(free), "the free queue repeats a block"
        assert set(free) == {b for b, c in enumerate(expected) if c == 0}, "free queue != unheld blocks"
        cached_flags = [self.prefix_cache.is_cached(b) for b in free]
        assert cached_flags == sorted(cached_flags), "an uncached free block sits behind a cached one"
        self.prefix_cache.check_integrity()
