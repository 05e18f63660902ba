"""Logits → next tokens: greedy, temperature, top-k, top-p, per-request seeded generators.

Pipeline for the random (temperature > 0) rows, all in fp32:

    logits / temperature ─▶ top-k mask ─▶ top-p mask ─▶ softmax ─▶ inverse CDF ─▶ token

The inverse CDF: one uniform u per row, and the token is the first whose cumulative probability
exceeds u times the row's total (searchsorted on the row's cumsum), which is distributed as
Categorical(p). A row's u comes from that row's generator alone, so a seeded request samples the
same tokens whatever else is in the batch and whatever row it sits in. Rows without a generator
share the Sampler's default generator (one per device, seeded from `Sampler(seed)`).

Why not the exponential race (argmax p_i / q_i with q_i ~ Exp(1), the usual GPU choice): it draws
a random number per vocabulary entry, and CPU torch draws Exp(1) at ~20 ns each, so 32 rows of a
49k vocabulary took ~30 ms a step; the inverse CDF takes ~0.8 ms. In fp32 the cumsum represents
each token's probability to within one rounding of the running sum (~6e-8), and u is scaled by
the row's own total, so nothing past the last token can be drawn.

Logprobs always describe the raw model distribution (log_softmax of the unmodified logits),
not the temperature/top-k/top-p distribution the token was drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvserve.outputs import TokenLogprob
from kvserve.sampling import SamplingParams

def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first, on ties): torch.max's indices, which CPU torch computes ~2.5×
    faster than argmax (1.0 → 0.4 ms for 32 rows of a 49k vocabulary)."""
    return logits.max(dim=-1).indices


@dataclass(frozen=True)
class SamplerOutput:
    """One sampled token per row, and its logprobs where that row's params asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Turns a batch of logits rows into tokens, one SamplingParams and optional generator per row."""

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._default_generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self,
        logits: torch.Tensor,                        # [num_rows, vocab], any float dtype
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> SamplerOutput:
        assert logits.dim() == 2, f"logits must be [num_rows, vocab], got {tuple(logits.shape)}"
        num_rows = logits.shape[0]
        assert len(params) == num_rows and len(generators) == num_rows, \
            f"{num_rows} logits rows but {len(params)} params and {len(generators)} generators"
        random_rows = [row for row, p in enumerate(params) if not p.greedy]
        wants_logprobs = any(p.logprobs is not None for p in params)

        if not random_rows and not wants_logprobs:
            # Fast path: greedy only. fp16/bf16 → fp32 is exact, so this is the argmax of the raw
            # logits; torch's CPU argmax is ~4× faster in fp32 than in bf16, conversion included,
            # and max(dim)'s indices (the first maximum too) ~2.5× faster than argmax on CPU.
            return SamplerOutput(greedy(logits.float()).tolist(), [None] * num_rows)

        logits = logits.float()                      # [num_rows, vocab]; never modified in place
        token_ids = greedy(logits)                   # [num_rows]; random rows overwritten below
        if random_rows:
            row_index = torch.tensor(random_rows, device=logits.device)
            token_ids[row_index] = self._sample(
                logits if len(random_rows) == num_rows else logits.index_select(0, row_index),
                [params[row] for row in random_rows],
                [generators[row] for row in random_rows],
            )
        logprobs = _logprobs(logits, token_ids, params) if wants_logprobs else [None] * num_rows
        return SamplerOutput(token_ids.tolist(), logprobs)

    def _sample(
        self,
        logits: torch.Tensor,                        # [num_random_rows, vocab], fp32
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:                               # [num_random_rows], int64
        temperatures = torch.tensor([p.temperature for p in params],
                                    dtype=torch.float32, device=logits.device)  # [num_random_rows]
        scaled = logits / temperatures[:, None]      # [num_random_rows, vocab]
        probs = _mask_top_k_top_p(scaled, params).softmax(dim=-1)  # [num_random_rows, vocab]
        uniforms = self._uniforms(probs, generators)                # [num_random_rows], in [0, 1)
        cdf = probs.cumsum(dim=-1)                                  # [num_random_rows, vocab]
        # right=True: the first token whose cdf exceeds the target, so a token of probability 0
        # (a flat step of the cdf) is never drawn. The target stays below the total even where
        # u·total rounds up to it: the total is first reached at the last token that can be drawn.
        totals = cdf[:, -1]
        targets = torch.minimum(uniforms * totals, torch.nextafter(totals, torch.zeros_like(totals)))
        tokens = torch.searchsorted(cdf, targets.unsqueeze(1), right=True).squeeze(1)
        return tokens.clamp_max_(probs.shape[1] - 1)      # a row of NaNs (a broken model) still names a token

    def _uniforms(
        self,
        probs: torch.Tensor,                         # [num_random_rows, vocab]
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:                               # [num_random_rows], U[0, 1) draws
        uniforms = torch.empty(len(generators), dtype=probs.dtype, device=probs.device)
        shared_rows = [row for row, g in enumerate(generators) if g is None]
        if shared_rows:
            draws = torch.rand(len(shared_rows), generator=self._default_generator(probs.device),
                               dtype=probs.dtype, device=probs.device)
            if len(shared_rows) == len(generators):
                return draws
            uniforms[torch.tensor(shared_rows, device=probs.device)] = draws
        for row, generator in enumerate(generators):
            if generator is not None:
                # the draw depends on this generator only
                uniforms[row:row + 1] = torch.rand(1, generator=generator, dtype=probs.dtype, device=probs.device)
        return uniforms

    def _default_generator(self, device: torch.device) -> torch.Generator:
        generator = self._default_generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self._seed)
            self._default_generators[device] = generator
        return generator


def _mask_top_k_top_p(
    scaled: torch.Tensor,                            # [num_rows, vocab], temperature applied
    params: Sequence[SamplingParams],
) -> torch.Tensor:                                   # [num_rows, vocab], filtered tokens at -inf
    """Top-k, then top-p on the renormalized top-k distribution. Rows with both off are unchanged.

    Top-p keeps the smallest prefix of the descending-probability order whose cumulative
    probability reaches top_p: token i is kept iff the mass strictly before it is < top_p, so
    the most likely token is always kept (the mass before it is exactly 0).
    """
    uses_top_k = any(p.top_k > 0 for p in params)
    uses_top_p = any(p.top_p < 1.0 for p in params)
    if not uses_top_k and not uses_top_p:
        return scaled
    num_rows, vocab = scaled.shape
    device = scaled.device
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)  # [num_rows, vocab] each
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)     # [num_rows, vocab]
    if uses_top_k:
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        ranks = torch.arange(vocab, device=device)                     # [vocab]
        keep_sorted &= ranks[None, :] < top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(~keep_sorted, float("-inf"))
    if uses_top_p:
        sorted_probs = sorted_logits.softmax(dim=-1)                   # [num_rows, vocab]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs       # exclusive cumsum
        # top_p == 1 means off: +inf keeps every token despite cumsum rounding past 1.
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params],
                             dtype=torch.float32, device=device)       # [num_rows]
        keep_sorted &= mass_before < top_p[:, None]
    keep = torch.empty_like(keep_sorted).scatter_(-1, sorted_ids, keep_sorted)  # original order
    return scaled.masked_fill(~keep, float("-inf"))


def _logprobs(
    logits: torch.Tensor,                            # [num_rows, vocab], fp32, unmodified
    token_ids: torch.Tensor,                         # [num_rows], the sampled tokens
    params: Sequence[SamplingParams],
) -> list[TokenLogprob | None]:
    rows = [row for row, p in enumerate(params) if p.logprobs is not None]
    row_index = torch.tensor(rows, device=logits.device)
    logprobs = logits.index_select(0, row_index).log_softmax(dim=-1)   # [num_lp_rows, vocab]
    sampled = token_ids.index_select(0, row_index)                     # [num_lp_rows]
    sampled_lp = logprobs.gather(1, sampled[:, None]).squeeze(1)       # [num_lp_rows]
    max_top = max(params[row].logprobs or 0 for row in rows)
    top_lp, top_ids = logprobs.topk(max_top, dim=-1)                   # [num_lp_rows, max_top], descending

    # One device → host transfer per tensor, then plain Python.
    sampled_list, sampled_lp_list = sampled.tolist(), sampled_lp.tolist()
    top_lp_list, top_ids_list = top_lp.tolist(), top_ids.tolist()
    result: list[TokenLogprob | None] = [None] * len(params)
    for i, row in enumerate(rows):
        num_top = params[row].logprobs or 0
        top = tuple(zip(top_ids_list[i][:num_top], top_lp_list[i][:num_top]))
        result[row] = TokenLogprob(sampled_list[i], sampled_lp_list[i], top)
    return result
