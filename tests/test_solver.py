"""Batched per-parameter gradient-norm clipping against torch's and detectron2's own clipping."""

import copy
import math
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.solver.build import maybe_add_gradient_clipping

from elixir_d2.solver import PerParameterNormClippedSGD, clip_grad_norm_per_parameter_


def _params_with_grads(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 3, 7, 7), (16,), (32, 16, 3, 3), (5,), (1,)]
    params = []
    for i, s in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(s, generator=g))
        # Spread the norms so that some gradients are clipped and some are left alone.
        p.grad = torch.randn(s, generator=g) * (0.05 if i % 2 else 2.0)
        params.append(p)
    return params


def test_hand_computed_factor():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])  # norm 5
    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([0.3, 0.4])  # norm 0.5, under the cap: unchanged
    clip_grad_norm_per_parameter_([p, q], max_norm=1.0)
    assert p.grad.tolist() == pytest.approx([0.6, 0.8], abs=1e-6)
    assert q.grad.tolist() == [pytest.approx(0.3), pytest.approx(0.4)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_matches_torch_clip_grad_norm_per_parameter(norm_type):
    ours, ref = _params_with_grads(0), _params_with_grads(0)
    no_grad = torch.nn.Parameter(torch.ones(3))  # skipped, as clip_grad_norm_ skips it
    clip_grad_norm_per_parameter_(ours + [no_grad], 1.0, norm_type)
    for p in ref:
        torch.nn.utils.clip_grad_norm_(p, 1.0, norm_type)
    assert no_grad.grad is None
    clipped = 0
    for a, b, before in zip(ours, ref, _params_with_grads(0)):
        assert torch.equal(a.grad, b.grad)  # bit for bit
        clipped += not torch.equal(a.grad, before.grad)
    assert 0 < clipped < len(ours)


def test_sgd_steps_equal_detectron2_clipped_sgd():
    cfg = get_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 4),
    )
    nets = [net, copy.deepcopy(net)]
    start = [p.detach().clone() for p in net.parameters()]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    opts = [
        PerParameterNormClippedSGD(nets[0].parameters(), max_norm=0.5, **kw),
        maybe_add_gradient_clipping(cfg, torch.optim.SGD)(nets[1].parameters(), **kw),
    ]
    x = torch.randn(4, 3, 8, 8) * 5
    for _ in range(5):
        for n, o in zip(nets, opts):
            o.zero_grad()
            (n(x) ** 2).sum().backward()
            o.step()
    for a, b, s in zip(nets[0].parameters(), nets[1].parameters(), start):
        assert torch.equal(a, b)
        assert not torch.equal(a, s)  # the steps did move every parameter


def test_rejects_non_positive_max_norm():
    with pytest.raises(ValueError, match="CLIP_VALUE"):
        PerParameterNormClippedSGD([torch.nn.Parameter(torch.zeros(1))], max_norm=0.0, lr=0.1)


def test_quickstart_configs_get_the_batched_clipping():
    from detectron2.modeling import build_model

    from elixir_d2 import load_config
    from elixir_d2.trainer import build_optimizer

    root = os.path.join(os.path.dirname(__file__), "..")
    cfg = load_config(os.path.join(root, "configs", "quickstart", "fpn.yaml"), [])
    opt = build_optimizer(cfg, build_model(cfg))
    assert isinstance(opt, PerParameterNormClippedSGD)
    assert opt.max_norm == cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 5.0
