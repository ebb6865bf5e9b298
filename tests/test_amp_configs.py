"""Every ElixirNet config (TRPN, ALB head or RTM; the search configs are in test_search_amp.py)
trains one step under autocast with finite losses and gradients (issue 16.4).

With CUDA: float16 autocast and a GradScaler, as detectron2's AMPTrainer (SOLVER.AMP.ENABLED)
runs them. On the CPU: bfloat16 autocast, the CPU's reduced precision; the deformable-conv
configs are skipped there, torchvision's CPU deform_conv2d having no bfloat16 kernel.
"""

import os

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from elixir_d2 import load_config
from elixir_d2.modeling.alb.genotype import save_genotype
from elixir_d2.search import sample_random_genotype

from config_files import CONFIGS, shipped_configs

torch.set_num_threads(1)
SMALL = ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _elixirnet_configs():
    names = []
    for name in shipped_configs():
        if os.path.basename(name).startswith("Base-"):
            continue
        cfg = load_config(os.path.join(CONFIGS, name), ["MODEL.WEIGHTS", ""])
        elixir = (
            cfg.MODEL.ROI_HEADS.NAME == "ElixirROIHeads"
            or cfg.MODEL.PROPOSAL_GENERATOR.NAME == "TRPN"
        )
        if elixir and cfg.MODEL.ROI_BOX_HEAD.NAME != "ALBSearchHead":
            names.append(name)
    return names


NAMES = _elixirnet_configs()


def test_the_list_covers_the_elixirnet_family():
    for name in (
        "elixirnet_R_50_FPN_deeplesion.yaml",
        "elixirnet_R_50_C4_deeplesion.yaml",
        "elixirnet_rtm_finetune_deeplesion.yaml",
        "ablation/trpn_rtm.yaml",
        "quickstart/elixirnet.yaml",
        "trpn_fpn_R_50_deeplesion.yaml",
    ):
        assert name in NAMES


def _batch(cfg, device, size=64):
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor([[18.0, 22.0, 38.0, 40.0]]))
    inst.gt_classes = torch.tensor([0])
    channels = len(cfg.MODEL.PIXEL_MEAN)
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(channels, size, size, generator=g) * 255,
            "instances": inst,
            "height": size,
            "width": size,
        }
        for _ in range(2)
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_config_trains_a_step_under_autocast(name, device, tmp_path):
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, *SMALL]
    cfg = load_config(os.path.join(CONFIGS, name), opts)
    if cfg.MODEL.ROI_BOX_HEAD.NAME == "ALBHead" and not os.path.exists(cfg.MODEL.ALB.GENOTYPE):
        # Table 6 configs point at search outputs: a random genotype of their space stands in.
        path = str(tmp_path / "genotype.yaml")
        save_genotype(sample_random_genotype(cfg.MODEL.ALB.SEARCH_SPACE, seed=0), path)
        cfg = load_config(os.path.join(CONFIGS, name), opts + ["MODEL.ALB.GENOTYPE", path])
    deformable = cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE and any(
        cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE
    )
    if device == "cpu" and deformable:
        pytest.skip("torchvision's CPU deform_conv2d has no bfloat16 kernel")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = _batch(cfg, device)
    if device == "cpu":
        grads = _grads_after(model, batch, "cpu", torch.bfloat16)
    else:
        grads = _grads_after_scaled(model, batch)
    assert grads and all(torch.isfinite(g).all() for g in grads)


def _forward(model, batch, device, dtype):
    with EventStorage(), torch.autocast(device_type=device, dtype=dtype):
        losses = model(batch)
        total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    return total


def _grads_after(model, batch, device, dtype):
    _forward(model, batch, device, dtype).backward()
    return [p.grad for p in model.parameters() if p.grad is not None]


def _grads_after_scaled(model, batch):
    """float16 + GradScaler as AMPTrainer: the scaler starts at 2^16 and halves on each
    overflow, so gradients must come out finite within 17 skipped steps (lr 0: same weights)."""
    scaler = torch.amp.GradScaler("cuda")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    for _ in range(17):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(_forward(model, batch, "cuda", torch.float16)).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            break
        scaler.step(optimizer)  # skipped: inf found
        scaler.update()
    return grads
