"""A pure-Python stand-in for the model runner that checks what the scheduler feeds it.

It keeps a fake KV cache: one token id per slot. Each chunk writes its tokens into their slots;
a sampling chunk then reads its whole context back through the block table and "predicts" a
token from it. If a block table, slot mapping, prefix-cache hit or recompute were wrong, the
context read back would differ from the request's real tokens and the prediction would change.
"""

import hashlib

from kvserve.sched.plan import ModelOutput, SchedulerOutput

VOCAB = 50


def next_token(context: list[int]) -> int:
    digest = hashlib.sha256(repr(context).encode()).digest()
    return digest[0] % VOCAB


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.slots: list[int | None] = [None] * (num_blocks * block_size)
        self.host: dict[int, list[int | None]] = {}     # host slot -> one block's tokens
        self.disk: dict[str, list[int | None]] = {}     # hash hex -> one block's tokens (a "file")
        self.num_tokens_run = 0

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        bs = self.block_size
        swaps = plan.swaps
        for name in swaps.disk_drop:                    # in SwapPlan's order; a file is never written twice
            del self.disk[name]                         # nor dropped or read when absent
        for slot, name in swaps.host_to_disk:
            assert name not in self.disk, name
            self.disk[name] = list(self.host[slot])
        for block, slot in swaps.swap_out:
            self.host[slot] = self.slots[block * bs:(block + 1) * bs]
        for slot, block in swaps.swap_in:
            self.slots[block * bs:(block + 1) * bs] = self.host[slot]
        for name, block in swaps.disk_to_device:
            self.slots[block * bs:(block + 1) * bs] = self.disk[name]
        sampled = {}
        for chunk in plan.chunks:
            for offset, token in enumerate(chunk.token_ids):
                position = chunk.start_position + offset
                self.slots[self._slot(chunk.block_ids, position)] = token
            self.num_tokens_run += chunk.num_tokens
            if chunk.samples:
                context = [self.slots[self._slot(chunk.block_ids, p)] for p in range(chunk.seq_len)]
                sampled[chunk.request_id] = next_token(context)
        return ModelOutput(sampled, {})

    def _slot(self, block_ids: tuple[int, ...], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size


def reference_output(prompt: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(tokens)
        tokens.append(t)
        out.append(t)
        if t == eos:
            break
    return out
