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
