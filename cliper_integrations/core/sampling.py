"""Sampling each row of a batch with its own settings, as a transformers ``LogitsProcessor``.

Kept apart from the guidance rule (``logits_processor.py``), whose code digest signs stored evaluation answers
(``decoding_rule``): those answers are greedy, and sampling does not touch them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor


class RowSamplingLogitsProcessor(LogitsProcessor):
    r"""Draws each row's next token with the row's own temperature, top-p and random generator, and leaves only
    that token, so that greedy search takes it.

    For a sampled row b (T_b > 0), with p_b = softmax(scores_b / T_b):

        keep     = the most likely tokens, in order, until their mass reaches top_p_b (the first always kept)
        x_b      = F⁻¹(u_b),  F the cumulative distribution of p_b restricted to ``keep``,  u_b ~ U(0, mass of keep)
        output_b = 0 at x_b, -inf elsewhere

    with u_b drawn from the row's own ``torch.Generator`` (seeded) or torch's global one (no seed). A greedy row
    (T_b = 0) keeps its argmax. Transformers' sampling takes one temperature, top-p and global random state for
    the whole batch; drawing per row here lets rows that sample differently, and rows with seeds of their own,
    share one ``generate`` call, and a seeded row's draws do not depend on what else is in the batch. It runs
    last, after guidance, where transformers would apply its temperature and top-p warpers.
    """

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float], seeds: Sequence[int | None]) -> None:
        rows = [index for index, temperature in enumerate(temperatures) if temperature > 0]
        self.sampled = torch.tensor(rows, dtype=torch.long)
        self.temperatures = torch.tensor([temperatures[index] for index in rows])[:, None]
        self.top_ps = torch.tensor([top_ps[index] for index in rows])[:, None]
        self.generators = [torch.Generator().manual_seed(seeds[i]) if seeds[i] is not None else None for i in rows]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = scores.argmax(dim=-1)
        if len(self.sampled):
            # sorted whatever the row's top-p, so that a row draws the same token for the same u in any batch
            probs, order = (scores[self.sampled].float() / self.temperatures).softmax(dim=-1).sort(descending=True)
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= self.top_ps, 0.0)
            cumulative = probs.cumsum(dim=-1)
            draws = torch.stack([torch.rand((), generator=generator) for generator in self.generators])
            picked = torch.searchsorted(cumulative, draws[:, None] * cumulative[:, -1:], right=True)
            chosen[self.sampled] = order.gather(1, picked.clamp(max=scores.shape[-1] - 1)).squeeze(1)
        return torch.full_like(scores, -math.inf).scatter_(1, chosen[:, None], 0.0)
