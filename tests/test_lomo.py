"""lomo: SGD fused into backward (FusedSGD); the CLI tests also cover adalomo (FusedAdaLomo, whose
rule tests/test_adalomo.py checks). A step is torch SGD's step, no gradient survives the
backward, schedulers drive it, a run resumes bitwise, and what it cannot do is refused in one line."""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hybridft.cli import main
from hybridft.engine.fused import FusedSGD
from hybridft.engine.methods import assign, build_optimizer
from hybridft.engine.methods import fo_optimizer as make_fo
from hybridft.engine.schedules import scheduler
from hybridft.run import checkpoint
from hybridft.run.closure import loss_closure
from tests.conftest import tiny_bert
from tests.test_cli import TINY, assert_refused
from tests.test_resume import assert_bitwise_equal, metrics_without_time

pytestmark = pytest.mark.usefixtures("one_thread")


def lomo_setup(lr: float = 0.05, weight_decay: float = 0.0):
    model = tiny_bert(seed=0).eval()  # eval: no dropout, so a copy computes the same function
    groups = assign("lomo", model)
    opt = build_optimizer(model, groups, zo_lr=1e-3, seed=0,
                          fo=functools.partial(make_fo, "fused-sgd", lr=lr, weight_decay=weight_decay))
    return model, groups, opt


def eval_loss(model, batch):
    return model(**batch).loss


def plain_closure(model, opt, batch):
    """The LBFGS-style closure without a change of mode (the model stays in eval mode)."""

    def closure():
        opt.zero_grad()
        loss = eval_loss(model, batch)
        if torch.is_grad_enabled():
            loss.backward()
        return loss.detach()

    return closure


def step_both(model, opt, reference, reference_opt, batch, steps: int, rel: float) -> None:
    """``steps`` steps of the fused optimizer (updates in backward) and of the reference optimizer
    stepping after backward on a copy of the model; their losses agree to ``rel`` at each."""
    for _ in range(steps):
        loss = opt.step(plain_closure(model, opt, batch))
        reference_opt.zero_grad()
        reference_loss = eval_loss(reference, batch)
        reference_loss.backward()
        reference_opt.step()
        assert float(loss) == pytest.approx(float(reference_loss.detach()), rel=rel)


def test_one_lomo_step_is_one_torch_sgd_step(batch):
    model, groups, opt = lomo_setup(lr=0.05, weight_decay=0.01)
    reference = copy.deepcopy(model)
    assert set(groups.fo) == {n for n, _ in model.named_parameters()} and not groups.zo  # every weight, FO
    step_both(model, opt, reference, torch.optim.SGD(reference.parameters(), lr=0.05, weight_decay=0.01), batch,
              steps=2, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
    assert opt.fo_optimizer.num_steps == 2 and not opt.fo_optimizer.state  # no optimizer state


def test_backward_frees_every_gradient_and_has_applied_the_update(batch):
    model, _, opt = lomo_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eval_loss(model, batch).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    opt.zero_grad()  # harmless: nothing to zero
    assert all(p.grad is None for p in model.parameters())


def test_the_hooks_read_the_scheduled_and_the_loaded_learning_rate():
    p = torch.nn.Parameter(torch.zeros(3))
    x = torch.tensor([1.0, 2.0, 3.0])
    opt = FusedSGD([p], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    (p * x).sum().backward()  # p -= 0.1 x
    opt.step()
    schedule.step()
    (p * x).sum().backward()  # p -= 0.05 x
    assert torch.allclose(p, -0.15 * x, rtol=0, atol=1e-7) and p.grad is None
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 1.0
    opt.load_state_dict(state)  # replaces the group dicts: the hook must read the new one
    (p * x).sum().backward()
    assert torch.allclose(p, -1.15 * x, rtol=0, atol=1e-6) and opt.num_steps == 1


def test_hybrid_optimizer_shares_the_fused_group_with_a_scheduler(batch):
    model, _, opt = lomo_setup(lr=0.05)
    sched = scheduler(opt, ["constant", "linear"], total_steps=4, warmup_steps=0)
    assert opt.param_groups[1] is opt.fo_optimizer.param_groups[0] and opt.updates_in_backward
    lrs = []
    for _ in range(2):
        opt.step(loss_closure(model, opt, batch, eval_loss))
        sched.step()
        lrs.append(opt.fo_optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.0375, 0.025])


class ZeroingSync:
    """A stand-in for ``DataParallel.in_backward``: agrees, counts the gradients it sees and
    replaces each by zero (so a step through it applies nothing)."""

    def __init__(self) -> None:
        self.agreed, self.gradients = 0, 0

    def agree(self, finite: bool) -> bool:
        self.agreed += 1
        return finite

    def __call__(self, grad: torch.Tensor) -> None:
        self.gradients += 1
        grad.zero_()


def test_a_step_gives_its_sync_to_the_fused_rule_for_that_step_only(batch):
    model, _, opt = lomo_setup(lr=0.05)
    before = copy.deepcopy(model.state_dict())
    sync = ZeroingSync()
    opt.step(loss_closure(model, opt, batch, eval_loss), sync=sync)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sync.agreed == 1 and sync.gradients == len(trained) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # every gradient went through it
    assert opt.fo_optimizer.sync is None
    opt.step(loss_closure(model, opt, batch, eval_loss))  # no sync: this step updates
    assert sync.gradients == len(trained)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_sync_for_a_rule_that_steps_after_backward_is_refused(batch):
    model = tiny_bert(seed=0).eval()
    groups = assign("fo-full", model)
    opt = build_optimizer(model, groups, zo_lr=1e-3, seed=0, fo=functools.partial(make_fo, "sgd", lr=0.1))
    with pytest.raises(ValueError, match="sync is for an FO rule that updates inside backward"):
        opt.step(loss_closure(model, opt, batch, eval_loss), sync=ZeroingSync())


def test_the_refusal_of_a_sync_names_a_zo_only_optimizer_as_having_no_fo_rule(batch):
    model = tiny_bert(seed=0).eval()
    opt = build_optimizer(model, assign("zo-full", model), zo_lr=1e-3, seed=0)
    with pytest.raises(ValueError, match=r"FO rule is none \(ZO only\)"):
        opt.step(loss_closure(model, opt, batch, eval_loss), sync=ZeroingSync())


def test_clipping_by_value_clamps_each_gradient_before_the_update():
    p = torch.nn.Parameter(torch.zeros(3))
    FusedSGD([p], lr=1.0, clip_value=0.5)
    (p * torch.tensor([0.1, -2.0, 3.0])).sum().backward()
    assert torch.equal(p.detach(), torch.tensor([-0.1, 0.5, -0.5]))


def test_a_non_finite_loss_is_not_back_propagated_and_the_step_applies_nothing(batch):
    model, _, opt = lomo_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(loss_closure(model, opt, batch, lambda m, b: eval_loss(m, b) * math.nan))
    assert opt.skipped and opt.skipped_steps == 1 and opt.fo_optimizer.num_steps == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    opt.step(loss_closure(model, opt, batch, eval_loss))
    assert not opt.skipped and any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


class Overflow(torch.autograd.Function):
    """The identity whose backward overflows: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * math.inf


def test_a_gradient_that_overflows_inside_backward_is_applied_then_the_next_steps_are_skipped(batch):
    """The documented limit (docs/lomo.md): only a non-finite loss is caught before backward."""
    model, _, opt = lomo_setup()
    opt.step(loss_closure(model, opt, batch, lambda m, b: Overflow.apply(eval_loss(m, b))))
    assert not opt.skipped and not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    opt.step(loss_closure(model, opt, batch, eval_loss))
    assert opt.skipped


@pytest.mark.parametrize("method,lr", [("lomo", "0.05"), ("adalomo", "0.01")])
def test_cli_fused_run_resumed_from_a_checkpoint_is_bitwise_the_uninterrupted_run(tiny_bert_dir, tmp_path, capsys,
                                                                                   method, lr):
    """lomo (no state) and adalomo (float32 factors in the checkpoint) resume bitwise."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    flags = ["--method", method, "--fo-lr", lr, "--fo-weight-decay", "0.01", "--checkpoint-every", "2",
             "--threads", "1", *TINY[:-3], "--steps", "4", "--no-progress"]
    assert main(["train", "--model", str(tiny_bert_dir), "--output-dir", str(reference), *flags]) == 0
    config = json.loads((reference / "config.json").read_text())
    assert config["resolved"]["zo_parameters"] == 0 and config["resolved"]["frozen_parameters"] == 0
    assert (reference / "zo_updates.jsonl").read_text() == ""
    initial = load_file(str(tiny_bert_dir / "model.safetensors"))
    trained = load_file(str(reference / "model" / "model.safetensors"))
    assert not torch.equal(initial["encoder.layer.0.attention.self.query.weight"],
                           trained["bert.encoder.layer.0.attention.self.query.weight"])  # the base moved

    shutil.copytree(reference, resumed)
    checkpoint.remove(checkpoint.step_dir(resumed, 4))
    (resumed / "eval.json").unlink()
    shutil.rmtree(resumed / "model")
    assert main(["train", "--resume", str(resumed), "--threads", "1", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert_bitwise_equal(reference / "model" / "model.safetensors", resumed / "model" / "model.safetensors")
    assert metrics_without_time(reference) == metrics_without_time(resumed)
    assert_refused(["replay", str(reference)], capsys, f"method '{method}' makes no ZO updates")


@pytest.mark.parametrize("method", ["lomo", "adalomo"])
@pytest.mark.parametrize("flags,message", [
    (["--grad-accum", "2"], "--grad-accum must be 1 for --method {method}"),
    (["--fo-momentum", "0.9"], "--fo-momentum must be 0 for --method {method}"),
    (["--z-cache"], "--z-cache and --embedding-rows need a method with a ZO part, not {method}"),
    (["--fused"], "--fused needs a method with both a ZO and an FO part"),
])
def test_what_a_fused_method_cannot_do_is_a_one_line_exit_2(tiny_bert_dir, tmp_path, capsys, flags, message, method):
    out = tmp_path / "bad"
    assert_refused(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), "--method", method, *TINY, *flags],
                   capsys, message.format(method=method))
    assert not out.exists()
