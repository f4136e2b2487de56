"""Invariants of the step-cost modes: fused estimator, z-cache, batch-row embedding directions,
z in the weights' dtype, parallel generation. A tiny BERT built from a config (vocab 200), and
an even tinier embedding classifier for the many-step invariants."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from hybridft.engine.directions import Directions, input_embedding_key
from hybridft.engine.methods import assign, build_optimizer
from hybridft.engine.perturb import perturb_into_, perturbed
from hybridft.engine.rules import replay_
from hybridft.engine.zo import direction, parameter_key
from hybridft.engine.estimators import FusedTwoSided
from hybridft.engine.rules import ZOSGD
from tests.conftest import sgd, zo_step
from tests.test_optim import closure_for as optim_closure_for

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny models on one thread


MODES = {
    "default": {},
    "fused": {"fused": True},
    "fused-one-sided": {"fused": True, "one_sided": True},
    "z-cache": {"z_cache": True, "threads": 2},
    "embedding-rows": {"embedding_rows": True},
    "z-dtype-param": {"z_dtype": "param", "distribution": "rademacher"},
    "all": {"fused": True, "z_cache": True, "embedding_rows": True, "threads": 2, "num_directions": 2,
            "z_dtype": "param", "distribution": "rademacher"},
}
NEW_PATHS = ["fused", "fused-one-sided", "z-cache", "embedding-rows", "all"]  # the default's test is test_zo's


class EmbeddingClassifier(nn.Module):
    """Embedding -> linear -> layer norm -> dropout -> mean -> head: a whole model in a few microseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.proj, self.norm = nn.Embedding(200, 8), nn.Linear(8, 8), nn.LayerNorm(8)
        self.drop, self.classifier = nn.Dropout(0.1), nn.Linear(8, 2)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.drop(torch.tanh(self.norm(self.proj(self.embed(input_ids))))).mean(1)
        return SimpleNamespace(loss=nn.functional.cross_entropy(self.classifier(hidden).float(), labels))


def tiny(dtype: torch.dtype = torch.float32, method: str = "hybrid", model: str = "bert", **modes):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, initializer_range=0.2)
    model = BertForSequenceClassification(config) if model == "bert" else EmbeddingClassifier()
    targets = ["query", "value"] if isinstance(model, BertForSequenceClassification) else ["proj"]
    if method == "hybrid":
        model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, modules_to_save=["classifier"]))
    model.to(dtype)
    groups = assign(method, model)
    zo_lr = modes.pop("zo_lr", 1e-2)
    opt = build_optimizer(model, groups, zo_lr=zo_lr, seed=3, fo=sgd(0.05), **zo_step(eps=1e-2, weight_decay=0.1, **modes))
    return model, groups, opt


def batch(step: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(1, 60, (4, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(2, (4,), generator=g)}


def closure_for(model, opt, data, same_mode: bool = True):
    return optim_closure_for(model, opt, data, same_mode=same_mode)


def base_weights(groups) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in groups.zo.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", NEW_PATHS)
def test_100_steps_at_zo_lr_0_leave_low_precision_weights_bitwise_unchanged(dtype, mode):
    model, groups, opt = tiny(dtype, model="mlp", **MODES[mode], zo_lr=0.0)
    opt.rule = ZOSGD(weight_decay=0.0)
    before = base_weights(groups)
    for step in range(100):
        opt.step(closure_for(model, opt, batch(step)))
    assert all(torch.equal(p, before[n]) for n, p in groups.zo.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_replay_rebuilds_every_mode_bitwise(mode, dtype):
    """In bf16 too, where the updates are stored by stochastic rounding (its noise is seeded)."""
    model, groups, opt = tiny(dtype, model="mlp", **MODES[mode])
    initial, log = base_weights(groups), []
    start = {n: t.clone() for n, t in initial.items()}
    for step in range(4):
        opt.step(closure_for(model, opt, batch(step)))
        log.append(opt.last_update)
    replay_(initial.items(), log)
    assert all(torch.equal(initial[n], p) for n, p in groups.zo.items())
    assert any(not torch.equal(start[n], p) for n, p in groups.zo.items())


def test_z_cache_and_threads_change_cost_not_results():
    runs = []
    for modes in ({}, {"z_cache": True}, {"threads": 2}):
        model, groups, opt = tiny(**modes)
        for step in range(3):
            opt.step(closure_for(model, opt, batch(step)))
        runs.append(base_weights(groups))
    assert all(torch.equal(runs[0][n], run[n]) for run in runs[1:] for n in runs[0])
    assert opt.last_cache_bytes == 0
    model, groups, opt = tiny(z_cache=True)
    opt.step(closure_for(model, opt, batch()))
    assert opt.last_cache_bytes == sum(p.numel() * p.element_size() for p in groups.zo.values())


@pytest.mark.parametrize("one_sided", [False, True])
def test_fused_projected_grad_is_the_separate_one(one_sided):
    """Same seed, same batch, eval mode: the fused step differences the same two losses."""
    grads = []
    for fused in (False, True):
        model, _, opt = tiny(fused=fused, one_sided=one_sided)
        model.eval()
        opt.step(closure_for(model, opt, batch()))
        grads.append(opt.last_update.projected_grads[0])
    assert grads[0] == pytest.approx(grads[1], rel=1e-4, abs=1e-4)


def test_fused_one_sided_step_is_the_separate_one_sided_step():
    """Same seed, batch and mode: the FO pass at theta is the same, and its loss is the anchor."""
    weights = []
    for fused in (False, True):
        model, groups, opt = tiny(fused=fused, one_sided=True)
        start = {n: p.detach().clone() for n, p in groups.fo.items()}
        for step in range(2):
            opt.step(closure_for(model, opt, batch(step)))
        assert all(not torch.equal(start[n], p) for n, p in groups.fo.items())  # the adapter learned
        weights.append({n: p.detach().clone() for n, p in (groups.zo | groups.fo).items()})
    assert all(torch.allclose(weights[0][n], weights[1][n], rtol=0, atol=1e-6) for n in weights[0])


def test_fused_two_sided_step_moves_the_adapter():
    model, groups, opt = tiny(fused=True)
    start = {n: p.detach().clone() for n, p in groups.fo.items()}
    for step in range(2):  # LoRA's B starts at 0, so A's gradient is 0 in the first step
        opt.step(closure_for(model, opt, batch(step)))
        assert all(p.grad is not None for p in groups.fo.values())
    assert all(not torch.equal(start[n], p) for n, p in groups.fo.items())


def test_fused_fo_pass_is_the_gradient_at_the_perturbed_point_and_restores_exactly():
    model, groups, opt = tiny()
    model.eval()
    data, eps = batch(), 1e-2
    directions = Directions(11)
    before = base_weights(groups)
    with perturbed(model, opt.keys, scale=eps, directions=directions, for_backward=True):
        opt.zero_grad()
        model(**data).loss.backward()
    fused = {n: p.grad.clone() for n, p in groups.fo.items()}
    assert all(torch.equal(p, before[n]) for n, p in groups.zo.items())

    moved = copy.deepcopy(model)  # theta + eps z held in place: what the fused pass must reproduce
    moved_keys = {p: opt.keys[q] for p, q in zip(moved.parameters(), model.parameters()) if q in opt.keys}
    for p, key in moved_keys.items():
        perturb_into_(p, p, key=key, directions=directions, scale=eps)
    moved(**data).loss.backward()
    reference = dict(moved.named_parameters())
    assert all(torch.equal(fused[n], reference[n].grad) for n in fused)
    assert any(fused[n].abs().sum() > 0 for n in fused)


def test_fused_refuses_a_closure_that_switches_modes_and_a_zo_only_method():
    model, _, opt = tiny(fused=True)
    with pytest.raises(ValueError, match="train/eval"):
        opt.step(closure_for(model, opt, batch(), same_mode=False))
    with pytest.raises(ValueError, match="FO part"):
        tiny(method="zo-full", fused=True)


def test_fused_dropout_masks_agree_between_the_fo_pass_and_the_forward():
    """Train mode, dropout on: at eps -> 0 the fused two-sided losses agree (common random numbers)."""
    model, _, opt = tiny(fused=True)
    opt.estimator = FusedTwoSided(eps=1e-9)
    seen = []
    closure = closure_for(model, opt, batch())

    def recording():
        seen.append(float(closure()))
        return torch.tensor(seen[-1])

    opt.step(recording)
    assert len(seen) == 2 and seen[0] == pytest.approx(seen[1], abs=1e-6)


def test_embedding_rows_update_only_the_batch_rows_and_log_them():
    model, groups, opt = tiny(embedding_rows=True)
    data = batch()
    embedding = model.get_input_embeddings()
    before = embedding.weight.detach().clone()
    opt.rule = ZOSGD(weight_decay=0.0)
    opt.step(closure_for(model, opt, data))
    changed = (embedding.weight != before).any(dim=1).nonzero().flatten()
    assert torch.equal(changed, torch.unique(data["input_ids"]))
    (key, rows), = opt.last_update.rows
    assert key == opt.keys[embedding.weight] and rows == tuple(torch.unique(data["input_ids"]).tolist())


def test_embedding_rows_in_bf16_round_only_the_batch_rows_and_replay_bitwise(monkeypatch):
    """Stochastic rounding of a bf16 embedding touches the batch's rows only (not a float32 copy
    of the whole table per step), other rows keep their bits, and replay rebuilds the weights."""
    import hybridft.engine.storage as zo

    rounded_rows, stochastic_round = [], zo.stochastic_round
    monkeypatch.setattr(zo, "stochastic_round", lambda exact, *a: rounded_rows.append(exact.shape) or stochastic_round(exact, *a))
    model, groups, opt = tiny(torch.bfloat16, embedding_rows=True)
    opt.rule = ZOSGD(weight_decay=0.0)
    embedding = model.get_input_embeddings().weight
    initial, log = base_weights(groups), []
    for step in range(3):
        before = embedding.detach().clone()
        opt.step(closure_for(model, opt, batch(step)))
        log.append(opt.last_update)
        ids = torch.unique(batch(step)["input_ids"])
        outside = torch.ones(len(embedding), dtype=torch.bool)
        outside[ids] = False
        assert torch.equal(embedding[outside].view(torch.int16), before[outside].view(torch.int16))
        assert (len(ids), embedding.shape[1]) in rounded_rows and embedding.shape not in rounded_rows
        rounded_rows.clear()
    assert any(not torch.equal(initial[n], p) for n, p in groups.zo.items())
    replay_(initial.items(), log)
    assert all(torch.equal(initial[n], p) for n, p in groups.zo.items())


def test_batch_row_estimate_is_unbiased_on_an_embedding_quadratic():
    """L = 0.5 ||E[ids] - T||^2: E[g P_B z] = grad L (zero outside the batch rows), within 5 stderr."""
    g0 = torch.Generator().manual_seed(0)
    embedding = nn.Embedding(12, 3).requires_grad_(False)
    embedding.weight.copy_(torch.randn(12, 3, generator=g0))
    ids, target = torch.tensor([[1, 4, 4, 7]]), torch.randn(1, 4, 3, generator=g0)
    keys = {embedding.weight: parameter_key("weight")}
    key, eps, n = keys[embedding.weight], 1e-3, 2000
    estimates = []
    with torch.no_grad():
        for seed in range(n):
            d = Directions(seed, row_keys=frozenset([key]))
            losses = []
            for scale in (eps, -eps):
                with perturbed(embedding, keys, scale=scale, directions=d):
                    losses.append(float(0.5 * ((embedding(ids) - target) ** 2).sum()))
            full = torch.zeros(12, 3, dtype=torch.float64)
            full[d.rows[key]] = d.z(embedding.weight, key).double()
            estimates.append((losses[0] - losses[1]) / (2 * eps) * full)
    stacked = torch.stack(estimates)
    mean, stderr = stacked.mean(0), stacked.std(0) / n**0.5
    true = torch.zeros(12, 3, dtype=torch.float64).index_add_(0, ids[0], (embedding(ids) - target)[0].double())
    assert torch.all((mean - true).abs() <= 5 * stderr + 1e-12)
    assert torch.all(mean[[0, 2, 3, 5, 6, 8, 9, 10, 11]] == 0)


def test_embedding_rows_refuse_tied_and_non_zo_embeddings():
    model = nn.Module()
    model.embed = nn.Embedding(10, 4).requires_grad_(False)
    model.head = nn.Linear(4, 10, bias=False).requires_grad_(False)
    model.head.weight = model.embed.weight  # tied, as a causal LM's output layer
    model.get_input_embeddings = lambda: model.embed
    keys = {p: parameter_key(n) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="untied"):
        input_embedding_key(model, keys)
    with pytest.raises(ValueError, match="not in the ZO set"):
        input_embedding_key(model, {})


def test_embedding_rows_refuse_a_causal_lm_with_tied_head_and_accept_its_classifier():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=0)
    for cls, tied in ((LlamaForCausalLM, True), (LlamaForSequenceClassification, False)):
        model = cls(config)
        keys = {p: parameter_key(n) for n, p in model.named_parameters()}
        if tied:
            with pytest.raises(ValueError, match="untied"):
                input_embedding_key(model, keys)
        else:
            assert input_embedding_key(model, keys) == keys[model.get_input_embeddings().weight]


def test_z_dtype_param_draws_in_the_weights_dtype():
    like = torch.empty(1000, dtype=torch.bfloat16)
    z = direction(like, seed=1, key=2, dtype="param")
    assert z.dtype == torch.bfloat16 and not torch.equal(z, direction(like, seed=1, key=2))
    assert torch.equal(direction(torch.empty(10), seed=1, key=2, dtype="param"), direction(torch.empty(10), seed=1, key=2))


def test_cli_runs_the_modes_and_refuses_them_where_they_mean_nothing(tiny_bert_dir, tmp_path, capsys):
    from hybridft.cli import main

    tiny_run = ["--model", str(tiny_bert_dir), "--train-size", "32", "--dev-size", "8", "--batch-size", "8",
                "--steps", "2", "--no-progress", "--threads", "1"]
    out = tmp_path / "fused"
    modes = ["--fused", "--z-cache", "--embedding-rows", "--zo-threads", "2", "--z-dtype", "param"]
    assert main(["train", *tiny_run, *modes, "--output-dir", str(out)]) == 0
    assert '"fused": true' in (out / "config.json").read_text()
    for flags, message in ((["--method", "zo-full", "--fused"], "--fused needs"),
                           (["--method", "fo-lora", "--z-cache"], "need a method with a ZO part"),
                           (["--zo-threads", "0"], "--zo-threads must be at least 1")):
        capsys.readouterr()
        assert main(["train", *tiny_run, *flags, "--output-dir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("shape", [(1000, 24), (3001, 7), (70_001,)])
def test_blockwise_generation_is_the_whole_draw(shape):
    """The update and an embedding's perturbation hold one block of z; the values must not change."""
    from hybridft.engine.zo import direction_blocks, direction_rows

    like = torch.empty(shape)
    whole = direction(like, seed=4, key=5)
    blocks = list(direction_blocks(like, seed=4, key=5, block_values=4096))
    assert len(blocks) > 2 and torch.equal(torch.cat([b for _, b in blocks]), whole)
    assert [start for start, _ in blocks] == [0, *torch.tensor([len(b) for _, b in blocks]).cumsum(0)[:-1].tolist()]
    rows = torch.tensor([0, 3, 17, shape[0] - 1])
    assert torch.equal(direction_rows(like, rows, seed=4, key=5, block_values=4096), whole[rows])
