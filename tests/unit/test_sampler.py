"""Sampler: greedy, temperature / top-k / top-p, seeded generators, logprobs."""

from __future__ import annotations

import pytest
import torch

from kvserve.runner.sampler import Sampler
from kvserve.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(num_rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=seeded(seed)) * 3  # [num_rows, vocab]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of observed counts against expected probabilities (same shape)."""
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def draw_counts(logits_row: torch.Tensor, params: SamplingParams, num_draws: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one logits row num_draws times in a single batch; count tokens."""
    logits = logits_row.expand(num_draws, -1)                              # [num_draws, vocab]
    out = Sampler(seed=0)(logits, [params] * num_draws, [generator] * num_draws)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.numel()).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = random_logits(7, 50, seed=0).to(dtype)
    out = Sampler()(logits, [GREEDY] * 7, [None] * 7)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 7


def test_greedy_ties_pick_the_lowest_id():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    assert Sampler()(logits, [GREEDY], [None]).token_ids == [1]
    with_logprobs = SamplingParams(temperature=0.0, logprobs=1)
    assert Sampler()(logits, [with_logprobs], [None]).token_ids == [1]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.5, top_k=1),
    SamplingParams(temperature=1.5, top_p=1e-6),
    SamplingParams(temperature=1.5, top_k=7, top_p=1e-6),
], ids=["top_k=1", "tiny_top_p", "top_k+tiny_top_p"])
def test_degenerate_filters_equal_greedy(params):
    sampler = Sampler()
    for step in range(5):
        logits = random_logits(6, 100, seed=step)
        generators = [seeded(row) if row % 2 else None for row in range(6)]
        assert sampler(logits, [params] * 6, generators).token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("target", [
    SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=123),
    SamplingParams(temperature=1.0, seed=123),     # no filter of its own; batch-mates use them
], ids=["filtered", "unfiltered"])
def test_seeded_request_is_independent_of_batch_composition(target):
    vocab, num_steps = 200, 25
    target_logits = random_logits(num_steps, vocab, seed=1)                # [num_steps, vocab]
    others = [GREEDY, SamplingParams(temperature=0.7, top_p=0.5),
              SamplingParams(temperature=1.3, top_k=5, seed=7), SamplingParams(temperature=0.2)]

    alone_sampler, alone_gen = Sampler(seed=0), seeded(123)
    alone = [alone_sampler(target_logits[step:step + 1], [target], [alone_gen]).token_ids[0]
             for step in range(num_steps)]

    batch_sampler, batch_gen = Sampler(seed=99), seeded(123)
    other_gens = [None, None, seeded(7), None]
    in_batch = []
    for step in range(num_steps):
        logits = random_logits(5, vocab, seed=1000 + step)
        logits[3] = target_logits[step]                                    # target at row 3
        params = others[:3] + [target] + others[3:]
        generators = other_gens[:3] + [batch_gen] + other_gens[3:]
        in_batch.append(batch_sampler(logits, params, generators).token_ids[3])
    assert alone == in_batch
    assert len(set(alone)) > 5                                             # it really sampled


def test_same_seed_same_tokens_different_seeds_differ():
    vocab, num_steps = 64, 64
    logits = torch.zeros(1, vocab)                                         # uniform
    params = SamplingParams(temperature=1.0)
    sampler = Sampler()

    def sequence(seed: int) -> list[int]:
        generator = seeded(seed)
        return [sampler(logits, [params], [generator]).token_ids[0] for _ in range(num_steps)]

    assert sequence(1) == sequence(1)
    matches = sum(a == b for a, b in zip(sequence(1), sequence(2)))
    assert matches < 10                                                    # ~1 expected by chance


def test_default_generator_is_seeded_by_the_sampler():
    logits = random_logits(16, 100, seed=3)
    params = [SamplingParams(temperature=1.0)] * 16
    assert Sampler(seed=5)(logits, params, [None] * 16) == Sampler(seed=5)(logits, params, [None] * 16)
    assert Sampler(seed=5)(logits, params, [None] * 16) != Sampler(seed=6)(logits, params, [None] * 16)


# chi-square critical values at p = 1e-4, by degrees of freedom (loose on purpose; seeds are fixed)
CHI2_BOUND = {1: 15.1, 3: 21.1, 5: 25.7}


@pytest.mark.parametrize("use_generator", [False, True], ids=["default_gen", "request_gen"])
def test_temperature_sampling_matches_softmax(use_generator):
    logits_row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    params = SamplingParams(temperature=0.7)
    counts = draw_counts(logits_row, params, 6000, seeded(11) if use_generator else None)
    assert chi_square(counts, torch.softmax(logits_row / 0.7, dim=-1)) < CHI2_BOUND[5]


def test_top_k_renormalizes_over_the_k_best():
    logits_row = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0, 2.5])
    counts = draw_counts(logits_row, SamplingParams(temperature=1.0, top_k=3), 6000)
    kept = torch.tensor([1, 3, 5])
    assert counts.sum() == counts[kept].sum()
    assert chi_square(counts[kept], torch.softmax(logits_row[kept], dim=-1)) < CHI2_BOUND[3]


@pytest.mark.parametrize("uniform", [0.0, 1.0 - 2.0 ** -24])     # U[0, 1)'s least and greatest fp32 draws
def test_extreme_draws_never_pick_a_filtered_token(monkeypatch, uniform):
    # Filtered tokens at both ends of the vocabulary: the inverse CDF is flat over them, and a draw
    # of (nearly) 1 times a total that rounds must still land on the last token that can be drawn.
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0, 2.5, -4.0] * 3]).expand(4, -1)
    monkeypatch.setattr(Sampler, "_uniforms", lambda self, probs, generators: torch.full((len(generators),), uniform))
    params = SamplingParams(temperature=1.0, top_k=4)               # the 4th best is 2.5; its ties are kept too
    tokens = Sampler(seed=0)(logits, [params] * 4, [None] * 4).token_ids
    kept = {i for i, v in enumerate(logits[0].tolist()) if v >= 2.5}
    assert set(tokens) <= kept
    assert tokens[0] == (min(kept) if uniform == 0.0 else max(kept))


def test_nan_logits_still_give_a_token_of_the_vocabulary():
    logits = torch.full((3, 10), float("nan"))
    tokens = Sampler(seed=0)(logits, [SamplingParams(temperature=1.0)] * 3, [None, seeded(1), None]).token_ids
    assert all(0 <= t < 10 for t in tokens)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    # Descending: 0.5, 0.3 (cumulative 0.8 ≥ 0.7), so tokens 1 and 3 are kept.
    counts = draw_counts(probs.log(), SamplingParams(temperature=1.0, top_p=0.7), 4000)
    assert counts[0] == 0 and counts[2] == 0
    assert chi_square(counts[[1, 3]], torch.tensor([0.625, 0.375])) < CHI2_BOUND[1]


def test_logprobs_are_raw_log_softmax_with_sorted_top_n():
    logits = random_logits(5, 40, seed=4).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0, logprobs=5), SamplingParams(temperature=0.5, logprobs=0),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.2, top_k=10, logprobs=20),
              SamplingParams(temperature=0.8)]
    out = Sampler()(logits, params, [None, seeded(1), None, None, seeded(2)])
    expected = torch.log_softmax(logits.float(), dim=-1)                   # [5, 40], raw distribution
    for row, p in enumerate(params):
        lp = out.logprobs[row]
        if p.logprobs is None:
            assert lp is None
            continue
        assert lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(expected[row, lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == p.logprobs
        top_values = [value for _, value in lp.top]
        assert top_values == sorted(top_values, reverse=True)
        ref_values, ref_ids = expected[row].topk(p.logprobs)
        assert [token for token, _ in lp.top] == ref_ids.tolist()
        assert top_values == pytest.approx(ref_values.tolist(), abs=1e-5)
    assert out.logprobs[1].top == ()


def test_mixed_greedy_and_random_batch():
    logits = random_logits(6, 30, seed=5)
    top3 = SamplingParams(temperature=1.0, top_k=3)
    params = [GREEDY, top3, GREEDY, SamplingParams(temperature=1.0), top3, GREEDY]
    sampler = Sampler()
    greedy_rows, seen = [0, 2, 5], {1: set(), 4: set()}
    for _ in range(40):
        out = sampler(logits, params, [None, seeded(_), None, None, None, None])
        argmax = logits.argmax(dim=-1).tolist()
        assert [out.token_ids[r] for r in greedy_rows] == [argmax[r] for r in greedy_rows]
        for row in seen:
            assert out.token_ids[row] in logits[row].topk(3).indices.tolist()
            seen[row].add(out.token_ids[row])
        assert 0 <= out.token_ids[3] < 30
    assert all(len(tokens) > 1 for tokens in seen.values())              # not collapsed to argmax


def test_greedy_takes_the_first_of_tied_maxima():
    from kvserve.runner.sampler import greedy

    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -3.0, -1.0]])
    assert greedy(logits).tolist() == [1, 0, 0] == logits.argmax(dim=-1).tolist()
