"""The CLIPer decoding rule as a transformers ``LogitsProcessor``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor

from cliper_integrations.core.classifier import BackboneState, PreferenceClassifier


class ClassifierGuidedLogitsProcessor(LogitsProcessor):
    r"""Reweights the next-token distribution by a preference classifier, one weight vector per row.

    For row b with weights α_b (one per class c), in log space:

        score(x) = log p_LM(x | prefix) + Σ_c α_{b,c} · log p_cls(c | prefix, x)
        output   = log_softmax(score)

    which samples from p_LM(x) · Π_c p_cls(c | prefix, x)^α_c, renormalized.

    * A negative α_c steers away from class c: with α_c = −α_d for the two poles c, d of one axis the
      bonus is α_d · log [p(x | prefix, d) / p(x | prefix, c)] in the bayes form, the posteriors'
      normaliser cancelling.
    * ``ending_weights`` (β, [batch, classes]) weigh the decision to end alone. With
      e(x) = Σ_c β_{b,c} · log p_cls(c | prefix, x), each ``always_include`` (end-of-turn) token gains

          e(end) − Σ_y q(y) · e(y),   q = p_LM renormalized over the scored tokens that are not ``always_include``

      and the written tokens gain nothing, so they keep the order ``weights`` give them. A class's other
      pole weighed so (β < 0) asks whether ending reads more like that pole than writing on does, without
      the push between written tokens that weighing it on every candidate brings, at a cost in fluency.
      Such rows measure the ``plausibility`` floor from their best written token, not from an end-of-turn
      token the base model is sure of, which would leave nothing to weigh ending against, and hold their
      end-of-turn tokens to it too: exempt, a large β could lift an end the base model finds implausible
      (mid-sentence, p ≈ 1e-6) over every written token and cut the answer off mid-word.
    * Rows whose weights are all zero are returned unchanged, bit for bit: α = 0 is exactly unguided.
    * ``top_k``: only the base model's k most likely tokens (plus ``always_include``, e.g. the
      end-of-turn tokens) are scored by the classifier; every other token is **masked** (-inf), as in
      FUDGE. Masking never changes greedy output for small α, since the unguided argmax is a candidate.
      ``top_k=None`` scores the whole vocabulary.
    * ``incremental``: the classifier's backbone state is updated with only the new tokens at each
      step; ``False`` recomputes it from the full sequence (slow, for checking).
    * ``suspend``: a callable giving, per step, the rows whose guidance is paused (inside a tool call
      or other span that must stay exactly as the base model writes it); those rows pass unchanged.
    * ``no_repeat_ngram``: on guided rows, a token that would repeat an n-gram already in the row's
      generated text is masked. Guidance pushes every step the same way, and a strong push can lock
      greedy decoding into a loop (the same few words over and over); the base model's own decoding
      is left alone (unguided rows and α = 0 stay bit for bit unguided) and the prompt does not count.
    * ``favourite_ngrams``: per row, the n the loop guard holds the base model's own most likely token
      to: ``None``, never banned (the guard then stops only the loops guidance leads into, and leaves the
      repeats the unguided model would write itself, whose banning costs fluency, perplexity, that some
      classes' guidance cannot spare); n, banned only when it would repeat an n-gram (a longer n than the
      guard's lets short repeats back but not loops, keeping more of the answer's variety, distinct-2).
      Every other repeating token stays banned by the guard's own n. Without it, the favourite is held
      to the guard's n like every other token.
    * ``plausibility`` (β in (0, 1]; or one β or ``None``, no floor, per row, so that rows whose classes
      need different floors share a batch): on guided rows, a token whose base probability is below β
      times that of the most likely token the loop guard allows is left out, whatever the classifier says
      (the adaptive plausibility constraint of contrastive decoding, Li et al. 2023);
      ``always_include`` tokens are exempt (except on rows that weigh ending, above), so an answer can still
      be ended early. Guidance then
      reorders only what the base model finds plausible: a large α can no longer lift a token of
      probability 0.001 over one of 0.5, which is what breaks fluency (near-loops, digit strings).
    * A row can never become all -inf or NaN: if guidance yields no finite score, the row falls back
      to the unguided distribution.

    Args:
        classifier: the preference classifier.
        weights: [batch, num_classes] guidance weights, in ``classifier.classes`` order.
        prompt_attention_mask: [batch, prompt_len] mask of the (left-padded) prompt batch.
        ending_weights: [batch, num_classes] weights of the decision to end; None: no such term.
    """

    def __init__(
        self,
        classifier: PreferenceClassifier,
        weights: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        top_k: int | None = 32,
        always_include: Sequence[int] = (),
        incremental: bool = True,
        suspend: Callable[[torch.LongTensor], torch.Tensor] | None = None,
        no_repeat_ngram: int | None = None,
        plausibility: float | Sequence[float | None] | None = None,
        favourite_ngrams: Sequence[int | None] | None = None,
        ending_weights: torch.Tensor | None = None,
    ) -> None:
        if weights.ndim != 2 or weights.shape[1] != len(classifier.classes):
            raise ValueError(f"weights must be [batch, {len(classifier.classes)}], got {tuple(weights.shape)}")
        if ending_weights is not None and ending_weights.shape != weights.shape:
            raise ValueError(
                f"ending_weights must be shaped as weights, {tuple(weights.shape)}, got {tuple(ending_weights.shape)}"
            )
        for name, given in (("weights", weights), ("ending_weights", ending_weights)):
            if given is not None and not torch.isfinite(given).all():
                raise ValueError(f"{name} must be finite")
        self.classifier = classifier
        self.weights = weights.float()
        self.ending_weights = None if ending_weights is None else ending_weights.float()
        self.ending_rows = (
            torch.zeros(weights.shape[0], dtype=torch.bool)
            if self.ending_weights is None
            else (self.ending_weights != 0).any(dim=-1)
        )
        self.guided_rows = (self.weights != 0).any(dim=-1) | self.ending_rows
        self.prompt_attention_mask = prompt_attention_mask
        self.top_k = top_k
        self.always_include = torch.tensor(sorted(set(always_include)), dtype=torch.long)
        self.state = BackboneState(incremental=incremental)
        self.suspend = suspend
        if no_repeat_ngram is not None and no_repeat_ngram < 2:
            raise ValueError(f"no_repeat_ngram must be at least 2, got {no_repeat_ngram}")
        self.no_repeat_ngram = no_repeat_ngram
        self.log_plausibility = self._log_floors(plausibility, weights.shape[0])
        if favourite_ngrams is not None:
            if len(favourite_ngrams) != weights.shape[0]:
                raise ValueError(f"favourite_ngrams must hold {weights.shape[0]} rows, got {len(favourite_ngrams)}")
            if any(n is not None and n < 2 for n in favourite_ngrams):
                raise ValueError(f"favourite_ngrams must be None or at least 2, got {list(favourite_ngrams)}")
        self.favourite_ngrams = favourite_ngrams

    @staticmethod
    def _log_floors(plausibility: float | Sequence[float | None] | None, rows: int) -> torch.Tensor | None:
        """[rows, 1] log β per row (-inf where a row has no floor); None when no row has one."""
        floors = plausibility if isinstance(plausibility, Sequence) else [plausibility] * rows
        if len(floors) != rows:
            raise ValueError(f"plausibility must hold {rows} rows, got {len(floors)}")
        if any(beta is not None and not 0 < beta <= 1 for beta in floors):
            raise ValueError(f"plausibility must be in (0, 1] or None, got {list(floors)}")
        if all(beta is None for beta in floors):
            return None
        return torch.tensor([[math.log(beta) if beta is not None else float("-inf")] for beta in floors])

    def _attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_attention_mask.shape[1]
        tail = self.prompt_attention_mask.new_ones((input_ids.shape[0], generated))
        return torch.cat([self.prompt_attention_mask, tail], dim=1)

    def _candidates(self, log_lm: torch.Tensor) -> torch.Tensor:
        """The top-k tokens and ``always_include``, each once: a token counted twice would weigh twice in
        the bayes form's normaliser (when one of them is already in the top-k, the next one joins)."""
        priority = log_lm
        if len(self.always_include):
            priority = log_lm.index_fill(1, self.always_include.to(log_lm.device), float("inf"))
        return priority.topk(min(self.top_k + len(self.always_include), log_lm.shape[-1]), dim=-1).indices

    def _implausible(self, log_lm: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
        """Tokens below the row's ``plausibility`` times its most likely token that is not ``banned``,
        ``always_include`` excepted. Measured from the best token still allowed: were it measured from a
        banned favourite, the exempt end-of-turn token could be all that is left, ending the answer. On rows
        that weigh the decision to end (``ending_weights``) it is measured from the best written token, so
        that where the base model is sure of ending there are still written candidates to weigh it against,
        and it holds the end-of-turn tokens too, so that weighing ending never lifts an implausible end."""
        assert self.log_plausibility is not None
        ends = self.always_include.to(log_lm.device)
        ending_rows = self.ending_rows.to(log_lm.device)[:, None]
        if self.ending_rows.any():
            banned = banned.clone()
            banned[:, ends] |= ending_rows
        best = log_lm.masked_fill(banned, float("-inf")).max(dim=-1, keepdim=True).values
        floor = best + self.log_plausibility.to(log_lm.device)
        implausible = log_lm < floor
        if len(ends):
            implausible[:, ends] &= ending_rows
        return implausible

    def _repeats(self, input_ids: torch.Tensor, active: torch.Tensor, vocab_size: int, n: int | None) -> torch.Tensor:
        """[B, V] True, on active rows, for each token that would complete an n-gram already in the
        generated text (all False for n None)."""
        banned = torch.zeros((input_ids.shape[0], vocab_size), dtype=torch.bool, device=input_ids.device)
        generated = input_ids[:, self.prompt_attention_mask.shape[1] :]
        if n is None or generated.shape[1] < n:
            return banned
        grams = generated.unfold(1, n, 1)  # [B, G, n]
        tail = generated[:, -(n - 1) :].unsqueeze(1)  # [B, 1, n-1]
        repeats = (grams[..., :-1] == tail).all(-1) & active[:, None]  # [B, G]
        rows, starts = repeats.nonzero(as_tuple=True)
        return banned.index_put((rows, grams[rows, starts, -1]), banned.new_tensor(True))

    def _hold_favourite(
        self, banned: torch.Tensor, input_ids: torch.Tensor, active: torch.Tensor, log_lm: torch.Tensor
    ) -> torch.Tensor:
        """``banned`` with the base model's favourite banned, on each row, by that row's own
        ``favourite_ngrams`` rule instead of the guard's."""
        assert self.favourite_ngrams is not None and self.no_repeat_ngram is not None
        favourite = log_lm.argmax(dim=-1)
        for n in set(self.favourite_ngrams) - {self.no_repeat_ngram}:
            rows = torch.tensor([b for b, own in enumerate(self.favourite_ngrams) if own == n], device=banned.device)
            held = self._repeats(input_ids, active, log_lm.shape[-1], n)
            banned[rows, favourite[rows]] = held[rows, favourite[rows]]
        return banned

    def _bonus(
        self, log_cls: torch.Tensor, candidates: torch.Tensor | None, candidate_log_lm: torch.Tensor
    ) -> torch.Tensor:
        """[B, N] what guidance adds to the scored tokens (log_cls [B, N, K] and candidate_log_lm [B, N] of the
        ``candidates`` [B, N], or of the whole vocabulary in id order for None): Σ_c α_c · log p_cls(c | x),
        and on the end-of-turn tokens the ``ending_weights``' term against the written tokens' expected one."""
        bonus = (log_cls * self.weights.to(log_cls.device)[:, None, :]).sum(-1)
        if self.ending_weights is None or not len(self.always_include):
            return bonus
        ends = self.always_include.to(log_cls.device)
        if candidates is None:
            at_end = torch.zeros(log_cls.shape[1], dtype=torch.bool, device=log_cls.device).index_fill(0, ends, True)
            at_end = at_end.expand(log_cls.shape[0], -1)
        else:
            at_end = torch.isin(candidates, ends)
        term = (log_cls * self.ending_weights.to(log_cls.device)[:, None, :]).sum(-1)
        written = torch.softmax(candidate_log_lm.masked_fill(at_end, float("-inf")), dim=-1)
        expected = (written * term.masked_fill(written == 0, 0.0)).sum(-1, keepdim=True)
        return bonus + torch.where(at_end, term - expected, 0.0)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        active = self.guided_rows.to(scores.device)
        if self.suspend is not None:
            active = active & ~self.suspend(input_ids).to(scores.device)
        if not active.any():
            return scores
        prefix = self.classifier.prefix_hidden(self.state, input_ids, self._attention_mask(input_ids))
        log_lm = torch.log_softmax(scores.float(), dim=-1)
        if self.top_k is None:
            log_cls = self.classifier.log_probs(prefix, None, log_lm)[:, : log_lm.shape[-1]]
            guided = log_lm + self._bonus(log_cls, None, log_lm)
        else:
            candidates = self._candidates(log_lm)
            candidate_log_lm = log_lm.gather(1, candidates)
            log_cls = self.classifier.log_probs(prefix, candidates, candidate_log_lm)
            guided = torch.full_like(log_lm, float("-inf"))
            guided.scatter_(1, candidates, candidate_log_lm + self._bonus(log_cls, candidates, candidate_log_lm))
        banned = self._repeats(input_ids, active, log_lm.shape[-1], self.no_repeat_ngram)
        if self.favourite_ngrams is not None and self.no_repeat_ngram is not None:
            banned = self._hold_favourite(banned, input_ids, active, log_lm)
        if self.log_plausibility is not None:
            banned = banned | self._implausible(log_lm, banned)
        guided = guided.masked_fill(guided.isnan() | banned, float("-inf"))
        guided = torch.log_softmax(guided, dim=-1)
        usable = active & torch.isfinite(guided).any(dim=-1)
        return torch.where(usable[:, None], guided.to(scores.dtype), scores)
