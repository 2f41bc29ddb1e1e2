"""RowSamplingLogitsProcessor: each row drawn with its own temperature, top-p and seed."""

from __future__ import annotations

import math

import torch

from cliper_integrations.core.sampling import RowSamplingLogitsProcessor


def drawn(processor, scores, steps):
    """The token each row is left with, at each of ``steps`` calls: [steps, rows]."""
    tokens = []
    for _ in range(steps):
        output = processor(None, scores.clone())
        assert bool(((output == 0) | (output == -math.inf)).all()) and bool(((output == 0).sum(-1) == 1).all())
        tokens.append(output.argmax(-1))
    return torch.stack(tokens)


def test_row_sampling_keeps_greedy_rows_at_argmax_and_samples_the_others_by_their_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5], [0.0, 1.0, 2.0, 0.5], [0.0, 1.0, 2.0, -math.inf]])
    processor = RowSamplingLogitsProcessor([0.0, 0.5, 2.0], [1.0, 1.0, 1.0], [None, 1, 2])
    tokens = drawn(processor, logits, 4000)
    assert bool((tokens[:, 0] == 2).all())
    for row, temperature in ((1, 0.5), (2, 2.0)):
        expected = torch.softmax(logits[row] / temperature, -1)
        observed = torch.bincount(tokens[:, row], minlength=4) / len(tokens)
        assert torch.allclose(observed, expected, atol=0.03), (row, observed, expected)
    assert not bool((tokens[:, 2] == 3).any())  # a masked token is never drawn


def test_row_sampling_draws_only_from_the_top_p_nucleus():
    probabilities = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    tokens = drawn(RowSamplingLogitsProcessor([1.0], [0.7], [3]), probabilities.log(), 4000)[:, 0]
    observed = torch.bincount(tokens, minlength=4) / len(tokens)
    assert torch.allclose(observed, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]), atol=0.03)


def test_a_seeded_rows_draws_do_not_depend_on_the_other_rows():
    row = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    alone = drawn(RowSamplingLogitsProcessor([0.9], [1.0], [5]), row, 40)[:, 0]
    others = torch.randn(2, 50)
    scores = torch.cat([others[:1], row, others[1:]])
    beside = drawn(RowSamplingLogitsProcessor([0.7, 0.9, 0.0], [0.8, 1.0, 1.0], [None, 5, None]), scores, 40)[:, 1]
    assert beside.tolist() == alone.tolist() and len(set(alone.tolist())) > 1
    other_seed = drawn(RowSamplingLogitsProcessor([0.9], [1.0], [6]), row, 40)[:, 0]
    assert other_seed.tolist() != alone.tolist()
