"""Pins: prefixes kept in the KV pool for a time-to-live that every hit renews. Pure Python.

A pin is keyed by the chained hash of its prefix's last full block (so the key names the whole
prefix, namespace included) and holds one reference on each of the prefix's blocks, so the block
pool never hands them out while the pin lives. This table only keeps the books: who is pinned,
until when, and which pins to let go first; the KV manager takes and drops the references.

    pins, oldest first            blocks held
    k1  [7, 3]      ttl 1h         7: 2 pins   (k2 extends k1: nested checkpoints share blocks)
    k2  [7, 3, 12]  ttl 5m         3: 2 pins
                                   12: 1 pin

The budget counts distinct pinned blocks; past it the oldest pins are released first.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Pin:
    key: bytes
    block_ids: tuple[int, ...]
    ttl_s: float
    expires_at: float

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class PinTable:
    def __init__(self, budget_blocks: int):
        assert budget_blocks >= 0
        self.budget_blocks = budget_blocks
        self._pins: OrderedDict[bytes, Pin] = OrderedDict()
        self._holders: Counter[int] = Counter()    # block id -> pins holding it

    def __len__(self) -> int:
        return len(self._pins)

    def __iter__(self):
        return iter(list(self._pins.values()))

    def get(self, key: bytes) -> Pin | None:
        return self._pins.get(key)

    @property
    def num_pinned_blocks(self) -> int:
        return len(self._holders)

    def holders(self) -> Counter[int]:
        return Counter(self._holders)

    def add(self, pin: Pin) -> None:
        assert pin.key not in self._pins
        self._pins[pin.key] = pin
        self._holders.update(pin.block_ids)

    def refresh(self, keys: Iterable[bytes], now: float) -> int:
        """A hit on these prefixes: each pin among them lives ttl_s from now. Returns how many."""
        refreshed = 0
        for key in keys:
            pin = self._pins.get(key)
            if pin is not None:
                pin.expires_at = max(pin.expires_at, now + pin.ttl_s)
                refreshed += 1
        return refreshed

    def pop_expired(self, now: float) -> list[Pin]:
        return [self._remove(p) for p in list(self._pins.values()) if p.expires_at <= now]

    def pop_over_budget(self) -> list[Pin]:
        """Release the oldest pins until the distinct pinned blocks fit the budget."""
        released = []
        while len(self._holders) > self.budget_blocks and self._pins:
            released.append(self._remove(next(iter(self._pins.values()))))
        return released

    def pop_oldest(self) -> Pin | None:
        return self._remove(next(iter(self._pins.values()))) if self._pins else None

    def pop_all(self) -> list[Pin]:
        return [self._remove(p) for p in list(self._pins.values())]

    def _remove(self, pin: Pin) -> Pin:
        del self._pins[pin.key]
        self._holders.subtract(pin.block_ids)
        for block_id in pin.block_ids:
            if self._holders[block_id] == 0:
                del self._holders[block_id]
        return pin
