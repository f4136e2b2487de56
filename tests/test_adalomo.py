"""adalomo: AdaLomo fused into backward (FusedAdaLomo). A step is transformers' Adafactor step without
a first moment (relative step on), no gradient survives the backward, and its state is factored and
kept in float32 through a state_dict. The CLI's resume and refusals: tests/test_lomo.py."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers.optimization import Adafactor

from hybridft.engine import fused
from hybridft.engine.fused import FusedAdaLomo
from hybridft.engine.methods import assign, build_optimizer
from hybridft.engine.methods import fo_optimizer as make_fo
from tests.conftest import tiny_bert
from tests.test_lomo import eval_loss, step_both

pytestmark = pytest.mark.usefixtures("one_thread")


def adalomo_setup(lr: float = 1e-2, weight_decay: float = 0.0):
    model = tiny_bert(seed=0).eval()  # eval: no dropout, so a copy computes the same function
    groups = assign("adalomo", model)
    opt = build_optimizer(model, groups, zo_lr=1e-3, seed=0,
                          fo=functools.partial(make_fo, "fused-adalomo", lr=lr, weight_decay=weight_decay))
    return model, groups, opt


@pytest.mark.parametrize("square_chunk", [None, 1000])  # 1000: g^2's row and column means from slices of a few rows
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_three_adalomo_steps_are_three_adafactor_steps_without_a_first_moment(batch, weight_decay, square_chunk,
                                                                              monkeypatch):
    if square_chunk is not None:
        monkeypatch.setattr(fused, "_SQUARE_CHUNK", square_chunk)
    model, groups, opt = adalomo_setup(lr=1e-2, weight_decay=weight_decay)
    reference = copy.deepcopy(model)
    assert set(groups.fo) == {n for n, _ in model.named_parameters()} and not groups.zo  # every weight, FO
    adafactor = Adafactor(reference.parameters(), lr=1e-2, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                          beta1=None, weight_decay=weight_decay, scale_parameter=True, relative_step=False,
                          warmup_init=False)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    step_both(model, opt, reference, adafactor, batch, steps=3, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert not torch.equal(p, initial[name]), name  # every weight moved
        if name.endswith("attention.self.key.bias"):
            # softmax ignores a key bias (it adds q.b to every logit of a row): its gradient is float
            # rounding noise, which g / sqrt(g^2) turns into steps of +-1 of either sign
            continue
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert opt.fo_optimizer.num_steps == 3


def test_the_state_is_a_row_and_a_column_per_matrix_in_float32(batch):
    model, _, opt = adalomo_setup()
    eval_loss(model, batch).backward()
    assert all(p.grad is None for p in model.parameters())  # freed in backward
    state, weights = opt.fo_optimizer.state, 0
    for p in model.parameters():
        values = state[p]
        weights += p.numel()
        assert values["step"] == 1
        if p.dim() >= 2:
            assert set(values) == {"step", "row", "col"}
            assert values["row"].shape == p.shape[:-1] and values["col"].shape == p.shape[-1:]
        else:
            assert set(values) == {"step", "sq"} and values["sq"].shape == p.shape
        assert all(v.dtype == torch.float32 for k, v in values.items() if k != "step")
    held = sum(v.numel() for values in state.values() for k, v in values.items() if k != "step")
    assert held < 0.2 * weights  # AdamW would hold 2 x weights


def test_a_bf16_model_keeps_float32_factors_through_a_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    x = torch.randn(5, 6)

    def backward(params):
        ((x.to(torch.bfloat16) @ params[0] + params[1]).float() ** 2).sum().backward()

    opt = FusedAdaLomo([w, b], lr=1e-2)
    for _ in range(2):
        backward([w, b])
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    w2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    opt2 = FusedAdaLomo([w2, b2], lr=1.0)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.num_steps == 2
    for p, q in ((w, w2), (b, b2)):
        for key, value in opt.state[p].items():
            if key == "step":
                assert opt2.state[q][key] == value == 2
            else:
                assert opt2.state[q][key].dtype == torch.float32 and torch.equal(opt2.state[q][key], value)
    before = w.detach().clone()
    backward([w, b])
    backward([w2, b2])  # the third step, continued from the loaded state: the same bf16 values
    assert not torch.equal(w.detach(), before)
    assert torch.equal(w.detach(), w2.detach()) and torch.equal(b.detach(), b2.detach())


@pytest.mark.parametrize("kwargs,message", [
    ({"eps": (1e-30,)}, "eps must be two values"),
    ({"eps": (1e-30, -1.0)}, "eps must be two values"),
    ({"clip_threshold": 0.0}, "clip_threshold must be positive"),
    ({"decay_rate": 0.5}, "decay_rate must be negative"),
    ({"lr": -1.0}, "lr must be 0 or more"),
])
def test_bad_constants_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedAdaLomo([torch.nn.Parameter(torch.zeros(2, 2))], **{"lr": 1e-3, **kwargs})
