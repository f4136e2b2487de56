"""Formulations: candidate scores and the causal loss equal their unbatched definitions, inputs are
cut from the left, and the encoder batches of the default path are plain tokenizer calls."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybridft.data.evaluate import accuracy
from hybridft.data.formulations import MultipleChoice, SequenceClassification
from hybridft.data.scoring import CandidateScoring, row, special_prefix
from hybridft.data.tasks import Example, load_task, winogrande
from hybridft.data.tasks.template import SENTIMENT, Template
from test_tasks import HUB_WINOGRANDE

CPU = torch.device("cpu")
EXAMPLES = [Example("a gorgeous, witty film", 1), Example("dull", 0),
            Example("it was far too long and the trophy does not fit in the suitcase", 0)]


def unbatched(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """log p(continuation | context) from one unpadded forward, and the continuation's length."""
    head = special_prefix(tokenizer) + tokenizer(context, add_special_tokens=False)["input_ids"]
    tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    logp = model(torch.tensor([head + tail])).logits[0].log_softmax(-1)
    return float(sum(logp[len(head) - 1 + i, t] for i, t in enumerate(tail))), len(tail)


@pytest.fixture(scope="module", params=["llama", "opt", "gpt2"])
def causal(request, tiny_causal_dirs):
    path = tiny_causal_dirs[request.param]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
@pytest.mark.parametrize("normalized", [False, True])
def test_batched_candidate_scores_equal_unbatched_log_likelihoods(causal, normalized):
    model, tokenizer = causal
    scoring = CandidateScoring(SENTIMENT, 128, length_normalized=normalized)
    scores = scoring.scores(model, scoring.encode(tokenizer, EXAMPLES, device=CPU))
    expected = [[total / n if normalized else total
                 for total, n in (unbatched(model, tokenizer, *pair) for pair in SENTIMENT.candidates(e))] for e in EXAMPLES]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-4)


@torch.no_grad()
def test_causal_loss_is_cross_entropy_of_the_correct_candidate_tokens_only(causal):
    model, tokenizer = causal
    scoring = CandidateScoring(winogrande.TEMPLATE, 128)
    examples = [winogrande.example(HUB_WINOGRANDE, "r"), winogrande.example({**HUB_WINOGRANDE, "answer": "2"}, "r")]
    loss = scoring.loss(model, scoring.encode(tokenizer, examples, device=CPU))
    totals = [unbatched(model, tokenizer, *winogrande.TEMPLATE.candidates(e)[e.label]) for e in examples]
    assert float(loss) == pytest.approx(-sum(t for t, _ in totals) / sum(n for _, n in totals), rel=1e-4)


SINGLE_TOKEN_WORDS = Template(prompt="Review: {text}\nSentiment:", label_words=(" terrible", " great"))


@torch.no_grad()
def test_single_token_label_words_use_one_row_per_example_with_the_same_scores_and_loss(causal):
    model, tokenizer = causal
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in SINGLE_TOKEN_WORDS.label_words)
    scoring = CandidateScoring(SINGLE_TOKEN_WORDS, 128)
    batch = scoring.encode(tokenizer, EXAMPLES, device=CPU)
    assert batch["input_ids"].shape[0] == len(EXAMPLES) and batch["candidate_ids"].shape == (len(EXAMPLES), 2)
    expected = [[unbatched(model, tokenizer, *pair)[0] for pair in SINGLE_TOKEN_WORDS.candidates(e)] for e in EXAMPLES]
    assert torch.allclose(scoring.scores(model, batch), torch.tensor(expected), atol=1e-4)
    correct = [expected[i][e.label] for i, e in enumerate(EXAMPLES)]
    assert float(scoring.loss(model, batch)) == pytest.approx(-sum(correct) / len(correct), rel=1e-4)


def test_candidates_with_different_contexts_or_several_tokens_keep_one_row_each(causal):
    _, tokenizer = causal
    several = CandidateScoring(Template(prompt="{text}", label_words=(" terrible", " gorgeous and witty")), 128)
    assert several.encode(tokenizer, EXAMPLES, device=CPU)["input_ids"].shape[0] == 2 * len(EXAMPLES)
    examples = [winogrande.example(HUB_WINOGRANDE, "r")]
    options = CandidateScoring(winogrande.TEMPLATE, 128).encode(tokenizer, examples, device=CPU)
    assert options["input_ids"].shape[0] == 2 and "candidate_ids" not in options


@torch.no_grad()
def test_accuracy_over_length_sorted_batches_is_the_per_example_accuracy(causal):
    model, tokenizer = causal
    examples = EXAMPLES + [Example(e.text, 1 - e.label) for e in EXAMPLES] + [Example("witty", 1)]
    for scoring in (CandidateScoring(SINGLE_TOKEN_WORDS, 128), CandidateScoring(SENTIMENT, 128)):
        hits = [int(scoring.predict(model, scoring.encode(tokenizer, [e], device=CPU))) == e.label for e in examples]
        for batch_size in (1, 2, 64):
            assert accuracy(model, scoring, tokenizer, examples, batch_size=batch_size, device=CPU) == pytest.approx(
                sum(hits) / len(hits))


def test_long_inputs_lose_the_start_of_the_context_not_the_continuation():
    assert row([1], list(range(10, 20)), [5, 6], 6, None) == ([1, 17, 18, 19, 5, 6], 2)
    assert row([], [1, 2], [5, 6, 7, 8], 3, None) == ([2, 5, 6], 2)
    assert row([], [], [5], 8, 0) == ([0, 5], 1)
    with pytest.raises(ValueError, match="empty context"):
        row([], [], [5], 8, None)


def test_special_prefix_of_each_tokenizer_family(tiny_causal_dirs, tokenizer):
    prefixes = {f: special_prefix(AutoTokenizer.from_pretrained(p)) for f, p in tiny_causal_dirs.items()}
    assert prefixes == {"llama": [1], "opt": [1], "gpt2": []}
    assert special_prefix(tokenizer) == [tokenizer.cls_token_id]  # [SEP] after the text is left out


def test_default_encoder_batches_are_plain_tokenizer_calls(tokenizer):
    examples = load_task("rotten_tomatoes").train[:16]
    batch = SequenceClassification(SENTIMENT, 64, 2).encode(tokenizer, examples, device=CPU)
    plain = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert set(batch) == {*plain, "labels"} and all(torch.equal(batch[k], plain[k]) for k in plain)


def test_multiple_choice_batches_hold_one_row_per_option(tokenizer):
    examples = [winogrande.example(HUB_WINOGRANDE, "r")] * 3
    batch = MultipleChoice(winogrande.TEMPLATE, 64).encode(tokenizer, examples, device=CPU)
    assert batch["input_ids"].shape[:2] == (3, 2) and batch["labels"].tolist() == [0, 0, 0]
    first = tokenizer.decode(batch["input_ids"][0, 0], skip_special_tokens=True)
    assert "the garage is small" in first
