"""CUDA against the CPU (the GPU check, scripts/gpu_check.sh): with the same weights and input,
the quickstart models' backbone features and box-head outputs on fixed proposals agree in
float32 (TF32 off), and whole-image inference on CUDA returns finite detections on the GPU.
Needs a CUDA device; the CPU-only suite covers the same code on the CPU."""

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from elixir_d2 import load_config
from elixir_d2.modeling.roi_heads import ElixirROIHeads

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="compares CUDA with the CPU: needs a CUDA device"
)

CONFIGS = [
    "configs/quickstart/fpn.yaml",
    "configs/quickstart/elixirnet.yaml",
    "configs/quickstart/elixirnet_deformv2.yaml",
]
SIZE = 96
BOXES = [
    [10.0, 12.0, 40.0, 44.0],
    [50.0, 20.0, 90.0, 60.0],
    [5.0, 60.0, 30.0, 90.0],
    [30.0, 30.0, 70.0, 70.0],
]


@pytest.fixture
def no_tf32():
    """float32 matrix products and convolutions in full float32 on CUDA, restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pair(config):
    """(CPU model, CUDA model) of ``config`` with the CPU one's random weights, in eval mode."""
    torch.manual_seed(0)
    cpu = build_model(load_config(config, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])).eval()
    gpu = build_model(load_config(config, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cuda"])).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@torch.no_grad()
def _outputs(model, image):
    """Backbone features and the box predictor's (scores, deltas) on BOXES."""
    images = model.preprocess_image([{"image": image}])
    feats = model.backbone(images.tensor)
    rh = model.roi_heads
    boxes = Boxes(torch.tensor(BOXES, device=model.device))
    if isinstance(rh, ElixirROIHeads):
        props = Instances((SIZE, SIZE))
        props.proposal_boxes = boxes
        pooled, counts = rh._pool_box_features(feats, [props])
        box_features, _ = rh._run_box_head(pooled, counts)
    else:
        box_features = rh.box_head(rh.box_pooler([feats[f] for f in rh.box_in_features], [boxes]))
    scores, deltas = rh.box_predictor(box_features)
    return {**{k: v for k, v in feats.items()}, "scores": scores, "deltas": deltas}


@pytest.mark.parametrize("config", CONFIGS)
def test_cuda_matches_the_cpu_in_float32(config, no_tf32):
    cpu, gpu = _pair(config)
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 255
    ref, out = _outputs(cpu, image), _outputs(gpu, image)
    assert set(ref) == set(out)
    for name, r in ref.items():
        o = out[name]
        assert o.device.type == "cuda" and o.dtype == torch.float32, name
        # Summation order differs between the devices: agreement to 1e-3 of the output's
        # scale; a wrong op or a missed device move is off by far more.
        scale = r.abs().max().item()
        torch.testing.assert_close(o.cpu(), r, rtol=0, atol=1e-3 * scale, msg=name)


@pytest.mark.parametrize("config", CONFIGS)
def test_inference_on_cuda_returns_finite_detections_on_the_gpu(config):
    _, gpu = _pair(config)
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        (res,) = gpu.inference([{"image": image, "height": SIZE, "width": SIZE}])
    inst = res["instances"]
    assert inst.pred_boxes.tensor.device.type == "cuda"
    assert torch.isfinite(inst.pred_boxes.tensor).all() and torch.isfinite(inst.scores).all()
    assert len(inst) <= gpu.roi_heads.box_predictor.test_topk_per_image
