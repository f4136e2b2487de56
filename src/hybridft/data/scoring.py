"""Candidate scoring with a causal LM (MeZO's formulation of classification and multiple choice).

Each example has C candidates (label words or options), each a (context, continuation) pair from
the task's template. A candidate's score is the log-likelihood of its continuation tokens given
the context,

    s_c = sum_t log p(y_t | context, y_<t)      (or s_c / |y|, length-normalised: ``score="mean"``)

and the prediction is argmax_c s_c. The training loss is the mean token cross-entropy of the
correct candidate's continuation only (the other candidates are not run): one forward and
backward over B rows. Prediction runs all B*C rows; its logits hold B*C*L*V floats.

When every candidate of every example shares its example's context and is a single token (label
words: SST-2's " negative"/" positive", WSC's "No"/"Yes"), a batch holds one row per example
instead: the context followed by the correct label word. Its last position is the loss's target,
and the position before it predicts every candidate at once (``candidate_ids``); the label word at
the end cannot leak into that prediction, which a causal LM computes from the context alone. The
scores are those of the C-row form; prediction costs a C-th of the rows.

Rows are right-padded, so positions of real tokens start at 0 in every model. An input longer
than ``max_length`` loses the start of its context, never its continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hybridft.data.tasks import Example
from hybridft.data.tasks.template import Template

Batch = dict[str, torch.Tensor]


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's <s>, OPT's </s>, BERT's
    [CLS]; none for GPT-2); special tokens it appends (BERT's [SEP]) are left out."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def row(prefix: list[int], context: list[int], continuation: list[int], max_length: int,
        fallback: int | None) -> tuple[list[int], int]:
    """One row's token ids and its number of continuation tokens, cut to ``max_length`` by
    dropping context tokens from the left (the continuation keeps at least one token and a
    token to be predicted from)."""
    room = max(2, max_length - len(prefix))
    continuation = continuation[: room - 1]
    keep = room - len(continuation)
    context = context[len(context) - keep :] if keep < len(context) else context
    head = prefix + context
    if not head:  # nothing to predict the first continuation token from: start with BOS/EOS
        if fallback is None:
            raise ValueError("an empty context needs a BOS, EOS or pad token, and the tokenizer has none")
        head = [fallback]
    return head + continuation, len(continuation)


@dataclass(frozen=True)
class CandidateScoring:
    template: Template
    max_length: int
    length_normalized: bool = True
    num_labels: int | None = None
    head: str = "AutoModelForCausalLM"

    def encode(self, tokenizer: Any, examples: Sequence[Example], *, device: torch.device) -> Batch:
        """(B*C, L) ``input_ids``/``attention_mask``, a ``target_mask`` on the continuation
        tokens, and ``labels`` (B,); row b*C + c is candidate c of example b."""
        specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        fallback = next((t for t in specials if t is not None), None)
        prefix = special_prefix(tokenizer)
        candidates = [self.template.candidates(e) for e in examples]
        if any(len(c) != len(candidates[0]) or not c for c in candidates):
            raise ValueError("every example needs the same, non-zero number of candidates (label words or options)")
        tokenized = [[(tokenizer(context, add_special_tokens=False)["input_ids"],
                       tokenizer(continuation, add_special_tokens=False)["input_ids"]) for context, continuation in pairs]
                     for pairs in candidates]
        for pairs, ids in zip(candidates, tokenized):
            for (_, continuation), (_, continuation_ids) in zip(pairs, ids):
                if not continuation_ids:
                    raise ValueError(f"candidate {continuation!r} has no tokens")
        one_row = all(len({c for c, _ in pairs}) == 1 and all(len(t) == 1 for _, t in ids)
                      for pairs, ids in zip(candidates, tokenized))
        if one_row:  # the context and the correct label word; see the module docstring
            rows = [row(prefix, ids[e.label][0], ids[e.label][1], self.max_length, fallback)
                    for e, ids in zip(examples, tokenized)]
        else:
            rows = [row(prefix, context_ids, continuation_ids, self.max_length, fallback)
                    for ids in tokenized for context_ids, continuation_ids in ids]
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (fallback or 0)  # masked out
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (ids, n_target) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            target_mask[i, len(ids) - n_target : len(ids)] = True
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask,
                 "labels": torch.tensor([e.label for e in examples])}
        if one_row:
            batch["candidate_ids"] = torch.tensor([[t[0] for _, t in ids] for ids in tokenized])
        return {k: v.to(device) for k, v in batch.items()}

    @staticmethod
    def correct_rows(batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        if "candidate_ids" in batch:  # one row per example
            return torch.arange(labels.shape[0], device=labels.device)
        n_candidates = batch["input_ids"].shape[0] // labels.shape[0]
        return torch.arange(labels.shape[0], device=labels.device) * n_candidates + labels

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the correct candidates' continuation tokens (B rows)."""
        rows = self.correct_rows(batch)
        mask = batch["attention_mask"][rows]
        width = int(mask.sum(1).max())
        input_ids, mask, target = batch["input_ids"][rows, :width], mask[:, :width], batch["target_mask"][rows, :width]
        return model(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(~target, -100)).loss

    def items(self, batch: Batch) -> int:
        """The continuation tokens of the correct candidates: the terms ``loss`` averages."""
        return int(batch["target_mask"][self.correct_rows(batch)].sum())

    def scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, C) candidate log-likelihoods (summed, or averaged over tokens when length-normalised)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1] : -1]  # prompt tuning: virtual tokens first
        target = batch["target_mask"][:, 1:]
        if "candidate_ids" in batch:  # the position before each row's label word predicts every candidate
            return torch.log_softmax(logits[target].float(), dim=-1).gather(-1, batch["candidate_ids"])
        picked = torch.log_softmax(logits[target].float(), dim=-1)
        token_logp = picked.gather(-1, batch["input_ids"][:, 1:][target].unsqueeze(-1)).squeeze(-1)
        row_of = torch.arange(target.shape[0], device=target.device).unsqueeze(1).expand_as(target)[target]
        sums = torch.zeros(target.shape[0], device=target.device).index_add_(0, row_of, token_logp)
        if self.length_normalized:
            sums = sums / target.sum(1)
        return sums.view(batch["labels"].shape[0], -1)

    def predict(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.scores(model, batch).argmax(-1)
