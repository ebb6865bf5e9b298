"""The DARTS roles of the search loop (issue 15): one optimiser step function shared by the
weight step and the Architect, which moves only the alphas; on a toy model, so it runs fast."""

import pytest
import torch
from torch import nn

from elixir_d2.search import Architect, optimizer_step, search_loss


class _Toy(nn.Module):
    """A weight and an alpha that both shape the loss, and a frozen part whose loss is constant."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.alpha = nn.Parameter(torch.zeros(2))
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, batch):
        x = torch.stack([b["x"] for b in batch])
        pred = (x * self.w * torch.softmax(self.alpha, 0)).sum(1)
        return {"loss_fit": (pred - 1.0).pow(2).mean(), "loss_rpn": self.frozen.sum()}


def _batch():
    return [{"x": torch.tensor([0.5, 1.0])}, {"x": torch.tensor([2.0, -1.0])}]


def test_search_loss_keeps_only_trainable_losses():
    total, values = search_loss(_Toy(), _batch())
    assert set(values) == {"loss_fit", "total_loss"} and total.requires_grad
    frozen = _Toy().requires_grad_(False)
    with pytest.raises(RuntimeError, match="trainable"):
        search_loss(frozen, _batch())


def test_weight_step_and_architect_step_move_only_their_parameters():
    model = _Toy()
    w_opt = torch.optim.SGD([model.w], lr=0.1)
    architect = Architect(model, torch.optim.Adam([model.alpha], lr=0.01))
    w0, a0 = model.w.detach().clone(), model.alpha.detach().clone()
    optimizer_step(model, _batch(), w_opt)
    assert not torch.equal(model.w, w0) and torch.equal(model.alpha, a0)
    assert model.alpha.grad is not None  # both sets are differentiated (DDP needs every grad)
    w1 = model.w.detach().clone()
    ref = _Toy()
    ref.load_state_dict(model.state_dict())
    expected = torch.autograd.grad(search_loss(ref, _batch())[0], ref.alpha)[0]
    values = architect.step(_batch())
    assert torch.equal(model.w, w1) and not torch.equal(model.alpha, a0)
    # The alpha gradient is this batch's at the current w, not summed with the weight step's.
    torch.testing.assert_close(model.alpha.grad, expected)
    # Adam's first step moves each entry with a gradient by about lr.
    torch.testing.assert_close((model.alpha - a0).abs(), torch.full((2,), 0.01))
    assert set(values) == {"loss_fit", "total_loss"}


def test_freeze_for_search_is_the_freeze_modules_mechanism():
    from elixir_d2.search import freeze_for_search

    class _Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
            self.proposal_generator = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
            self.roi_heads = nn.Linear(2, 2)

    model = _Detector()
    freeze_for_search(model)
    model.train()  # as the trainer does; the frozen norms return to eval at their forward
    stats = [t.clone() for t in model.backbone[1].buffers()]
    model.proposal_generator(model.backbone(torch.randn(2, 1, 4, 4)))
    assert not model.backbone[1].training and not model.proposal_generator[1].training
    assert all(torch.equal(a, b) for a, b in zip(stats, model.backbone[1].buffers()))
    assert model.proposal_generator.training  # training-time proposal counts
    assert not any(
        p.requires_grad
        for n in ("backbone", "proposal_generator")
        for p in getattr(model, n).parameters()
    )
    assert all(p.requires_grad for p in model.roi_heads.parameters())
    with pytest.raises(ValueError, match="has none"):
        freeze_for_search(nn.Module())
