"""CUDA graphs of all-decode steps (issue 10): a decode step of a small model is hundreds of
kernel launches, each a few microseconds of host time, for a millisecond of GPU work. Captured
once, a step is replayed with one launch.

- **The ladder.** Graphs are captured at start-up for a ladder of batch sizes up to
  --max-num-seqs (1, 2, 4, 8, then every 16); a step of n decode rows replays the smallest size
  >= n, its other rows padded. Each size is run once eagerly first (Triton compiles its kernels
  there), then captured, the largest first, all sharing one memory pool.
- **Persistent inputs.** The graphs read fixed device buffers (token ids, positions, cache slots,
  context lengths, block tables); a step fills them from pinned host buffers with asynchronous
  copies. Padded rows have slot -1 (their K/V are not written) and context 0 (they attend to
  nothing and give zeros), so they touch no real block. Eager decode steps split their keys as the
  graphs do (the backend's `decode_split_len`), so both compute the same sums in the same order.
- **What stays outside.** The LM head and sampling run after the replay, on the rows that are
  real; reading the sampled ids is the step's one synchronisation.

Only the `triton` backend is captured: its per-step host work is the grid, fixed for a size (the
keys are split as for the longest context the model allows, which is right for any shorter one).
The torch reference builds masks on the host from each step's lengths, which a graph would
freeze. A capture that fails is logged and the runner stays eager. `--enforce-eager` skips it.

The ladder and the filling of the inputs are plain torch and tested on the CPU.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence

import torch

from kvserve.attention.backend import AttentionMetadata
from kvserve.runner.inputs import padded_rows

log = logging.getLogger(__name__)


def graph_ladder(max_num_seqs: int) -> tuple[int, ...]:
    """The batch sizes captured: 1, 2, 4, 8, then every 16, and max_num_seqs itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return tuple(sorted(sizes))


def padded_size(num_rows: int, ladder: Sequence[int]) -> int | None:
    """The smallest captured size holding `num_rows` rows (None: more rows than any graph)."""
    i = bisect.bisect_left(ladder, num_rows)
    return ladder[i] if i < len(ladder) else None


class DecodeInputs:
    """The persistent buffers a captured decode step reads, and their filling. On the CPU (tests)
    the host staging buffers are the same memory as the "device" ones."""

    def __init__(self, max_rows: int, max_blocks_per_seq: int, block_size: int, device: torch.device):
        self.max_rows, self.block_size, self.device = max_rows, block_size, device
        pin = device.type == "cuda"

        def pair(shape):
            host = torch.zeros(shape, dtype=torch.int64, pin_memory=pin)
            return host, (host if device.type == "cpu" else torch.zeros(shape, dtype=torch.int64, device=device))

        self._host_ids, self.input_ids = pair((max_rows,))
        self._host_positions, self.positions = pair((max_rows,))
        self._host_slots, self.slot_mapping = pair((max_rows,))
        self._host_lens, self.seq_lens = pair((max_rows,))
        self._host_table, self.block_table = pair((max_rows, max_blocks_per_seq))
        self.query_start_loc = torch.arange(max_rows + 1, dtype=torch.int64, device=device)   # one token a row

    def metadata(self, rows: int, max_seq_len: int) -> AttentionMetadata:
        """The metadata of a graph of `rows` rows (its host lengths: the longest a context may be)."""
        return AttentionMetadata(self.slot_mapping[:rows], self.query_start_loc[:rows + 1], self.seq_lens[:rows],
                                 self.block_table[:rows], self.block_size, tuple(range(rows + 1)),
                                 (max_seq_len,) * rows)

    def fill(self, rows: int, token_ids: Sequence[int], positions: Sequence[int],
             block_tables: Sequence[Sequence[int]]) -> None:
        """Row i decodes token_ids[i] at positions[i] with block table block_tables[i]; rows
        len(token_ids)..rows-1 are padding (slot -1, context 0)."""
        n = len(token_ids)
        assert n <= rows <= self.max_rows
        self._host_ids[:n] = torch.tensor(token_ids, dtype=torch.int64)
        self._host_positions[:n] = torch.tensor(positions, dtype=torch.int64)
        slots = [table[p // self.block_size] * self.block_size + p % self.block_size
                 for table, p in zip(block_tables, positions)]
        self._host_slots[:n] = torch.tensor(slots, dtype=torch.int64)
        self._host_lens[:n] = torch.tensor(positions, dtype=torch.int64) + 1
        width = max(len(t) for t in block_tables)
        table = padded_rows(block_tables, width)
        self._host_table[:n, :width] = torch.frombuffer(table, dtype=torch.int64).view(n, width)
        self._host_ids[n:rows] = 0
        self._host_positions[n:rows] = 0
        self._host_slots[n:rows] = -1
        self._host_lens[n:rows] = 0
        if self.device.type != "cpu":
            for host, device in ((self._host_ids, self.input_ids), (self._host_positions, self.positions),
                                 (self._host_slots, self.slot_mapping), (self._host_lens, self.seq_lens)):
                device[:rows].copy_(host[:rows], non_blocking=True)
            # Whole rows: a contiguous pinned slice, so the copy stays asynchronous.
            self.block_table[:rows].copy_(self._host_table[:rows], non_blocking=True)


class DecodeGraphs:
    """The captured decode steps of one model and its KV caches."""

    def __init__(self, model, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device):
        self.model, self.kv_caches = model, kv_caches
        self.ladder = graph_ladder(max_num_seqs)
        self.max_model_len = max_model_len
        self.inputs = DecodeInputs(self.ladder[-1], -(-max_model_len // block_size), block_size, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size of the ladder (largest first, one pool); logs time and memory."""
        start, before = time.perf_counter(), torch.cuda.memory_allocated()
        pool = torch.cuda.graph_pool_handle()
        for rows in reversed(self.ladder):
            self.inputs.fill(rows, [0], [0], [[0]])          # one real row at position 0 of block 0, slot -1 after
            self.inputs.slot_mapping[:rows].fill_(-1)        # the warm-up and capture write no cache
            metadata = self.inputs.metadata(rows, self.max_model_len)
            ids, positions = self.inputs.input_ids[:rows], self.inputs.positions[:rows]
            self.model(ids, positions, self.kv_caches, metadata)   # eager once: Triton compiles here
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[rows] = self.model(ids, positions, self.kv_caches, metadata)
            self.graphs[rows] = graph
        torch.cuda.synchronize()
        log.info("CUDA graphs captured for %d decode batch sizes (1..%d) in %.1f s, %.0f MB",
                 len(self.ladder), self.ladder[-1], time.perf_counter() - start,
                 (torch.cuda.memory_allocated() - before) / 1e6)

    def run(self, token_ids: Sequence[int], positions: Sequence[int],
            block_tables: Sequence[Sequence[int]]) -> torch.Tensor | None:
        """The hidden states of a decode step's rows (None: more rows than any graph)."""
        rows = padded_size(len(token_ids), self.ladder)
        if rows is None:
            return None
        self.inputs.fill(rows, token_ids, positions, block_tables)
        self.graphs[rows].replay()
        return self.outputs[rows][:len(token_ids)]
