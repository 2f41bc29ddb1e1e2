"""Guidance by the prompted base model itself, in the trained head's place: how far distillation could go.

Every head here is taught (directly, or through ``cliper train --teacher``) what the base model does when its
prompt asks for a class. This measures the ceiling of that teaching: for the ``teacher`` classes, the
classifier's posterior is replaced by the base model's own Bayes posterior over the plain question and the
question with each teacher class's request (uniform prior, GeDi-style; Krause et al. 2021),

    log p(c | prefix, x) = log p_LM(x | request_c, prefix) − log Σ_{c' ∈ {plain} ∪ teacher} p_LM(x | request_c', prefix)

with ``request_plain`` the question alone, i.e. the row being decoded (guidance alone only). Every other part
of the decoding rule (α and its per-class factors, floors, loop guard, refusal look-ahead) is the packaged
classifier's, so a probe row differs from the packaged head's row in the posterior alone. Each teacher class
costs one more forward pass of the base model per step, which is why it is a measurement, not a product
setting. Used by ``steering_probe.py --teacher``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from cliper_integrations.core.classifier import BackboneState, PreferenceClassifier
from cliper_integrations.core.engine import left_padded
from cliper_integrations.core.prompting import as_messages, question_ids, render_chat, with_preference_request


class TeacherGuidedClassifier(PreferenceClassifier):
    """The packaged classifier with the ``teacher`` classes' posterior read off the prompted base model."""

    def __init__(self, packaged: PreferenceClassifier, tokenizer, questions: Sequence[str], teacher: Sequence[str]):
        super().__init__(packaged.config, packaged.backbone, packaged.head)
        unknown = set(teacher) - set(packaged.classes)
        if unknown:
            raise ValueError(f"teacher classes {sorted(unknown)} are not the classifier's {packaged.classes}")
        self.teacher = list(teacher)
        self.teacher_columns = [packaged.classes.index(name) for name in teacher]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.requested = {
            tuple(question_ids(tokenizer, question)): [
                tokenizer(
                    render_chat(tokenizer, with_preference_request(as_messages(question), {name: 1.0})),
                    add_special_tokens=False,
                )["input_ids"]
                for name in self.teacher
            ]
            for question in questions
        }
        self._teacher_log_lm: torch.Tensor | None = None

    def guidance_digest(self, classes: Sequence[str] | None = None, prompted: bool | None = None) -> str:
        """The packaged digest with the teacher classes mixed in: these rows steer otherwise, and a saved
        answer must not pass for the packaged head's."""
        packaged = super().guidance_digest(classes, prompted)
        return hashlib.sha256(f"{packaged} teacher {','.join(self.teacher)}".encode()).hexdigest()

    def _requested_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        """Each row's prompt with each teacher class's request, in row-major order ([row][class]); what the
        row holds past its plain question (an opening the engine put there) follows the request too."""
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.bool().tolist(), strict=True):
            held = [token for token, kept in zip(ids, mask, strict=True) if kept]
            plain = next((key for key in self.requested if tuple(held[: len(key)]) == key), None)
            if plain is None:
                raise ValueError("a row's prompt is none of the questions the teacher was given")
            rows += [requested + held[len(plain) :] for requested in self.requested[plain]]
        return rows

    @torch.no_grad()
    def _advance_teacher(self, state: BackboneState, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Read the new tokens into the prompted copies (every copy of a row takes the row's tokens) and keep
        their next-token log-probs [B, teacher, V]."""
        copies = len(self.teacher)
        if "teacher_cache" not in state.extra:
            new, mask = left_padded(self._requested_rows(input_ids, attention_mask), self.pad_token_id)
            state.extra.update(teacher_cache=DynamicCache(config=self.backbone.config), teacher_mask=mask)
        else:
            new = input_ids[:, state.extra["teacher_consumed"] :].repeat_interleave(copies, dim=0)
            mask = torch.cat([state.extra["teacher_mask"], torch.ones_like(new)], dim=1)
            state.extra["teacher_mask"] = mask
        state.extra["teacher_consumed"] = input_ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1] :]
        logits = self.backbone(
            input_ids=new,
            attention_mask=mask,
            position_ids=positions,
            cache=state.extra["teacher_cache"],
            use_cache=True,
        ).logits[:, -1, :]
        self._teacher_log_lm = torch.log_softmax(logits.float(), dim=-1).view(input_ids.shape[0], copies, -1)

    def prefix_hidden(
        self, state: BackboneState, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        hidden = super().prefix_hidden(state, input_ids, attention_mask)
        self._advance_teacher(state, input_ids, attention_mask)
        return hidden

    def log_probs(
        self,
        prefix_hidden: torch.Tensor,
        candidates: torch.Tensor | None = None,
        candidate_log_lm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scores = super().log_probs(prefix_hidden, candidates, candidate_log_lm)
        if candidate_log_lm is None or self._teacher_log_lm is None:
            raise ValueError("teacher guidance needs the base model's log-probs of the candidates")
        teacher = self._teacher_log_lm
        if candidates is not None:
            teacher = teacher.gather(2, candidates.unsqueeze(1).expand(-1, teacher.shape[1], -1))
        else:
            teacher = teacher[..., : candidate_log_lm.shape[-1]]
        joint = torch.cat([candidate_log_lm.unsqueeze(1), teacher], dim=1)  # [B, 1 + teacher, N]
        posterior = joint - joint.logsumexp(dim=1, keepdim=True)
        scores = scores.clone()
        scores[..., : candidate_log_lm.shape[-1], self.teacher_columns] = posterior[:, 1:].transpose(1, 2)
        return scores
