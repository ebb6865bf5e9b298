"""Mixed precision: the autocast a config asks for, and the training loop that runs it.

``SOLVER.AMP.ENABLED`` is detectron2's switch; its AMPTrainer is float16 autocast with a
GradScaler, on CUDA only. ``SOLVER.AMP.PRECISION`` (an ElixirNet key) adds ``bfloat16``:
autocast without loss scaling (bfloat16 has float32's exponent range, so gradients neither
underflow nor overflow), on CUDA or on the CPU, where oneDNN runs convolutions and matrix
products in bfloat16 natively on CPUs with AVX512-BF16 or AMX (:func:`native_cpu_bfloat16`).
The computations that half precision breaks stay float32 inside the model either way
(docs/design.md, "Mixed precision").
"""

from __future__ import annotations

import platform
import time
from typing import List, Optional

import torch

from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = [
    "PRECISIONS",
    "AutocastTrainer",
    "amp_opts",
    "autocast_dtype",
    "build_step_trainer",
    "native_cpu_bfloat16",
]

PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype(cfg: CfgNode) -> Optional[torch.dtype]:
    """The autocast dtype of ``cfg``'s SOLVER.AMP, None when it is off. ValueError naming the
    key for a precision other than float16 / bfloat16, and for float16 off CUDA."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    name = cfg.SOLVER.AMP.PRECISION
    if name not in PRECISIONS:
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of {sorted(PRECISIONS)}, got {name!r}")
    device = torch.device(cfg.MODEL.DEVICE).type
    if name == "float16" and device != "cuda":
        raise ValueError(
            f"SOLVER.AMP.ENABLED True with SOLVER.AMP.PRECISION float16 needs MODEL.DEVICE cuda "
            f"(got {cfg.MODEL.DEVICE!r}): float16 training is detectron2's AMPTrainer, CUDA "
            "only; on the CPU set SOLVER.AMP.PRECISION bfloat16, or SOLVER.AMP.ENABLED False"
        )
    return PRECISIONS[name]


def amp_opts(precision: str) -> List[str]:
    """Config overrides (KEY VALUE ...) that train in ``precision``: "float32" (AMP off),
    "float16" or "bfloat16"."""
    if precision == "float32":
        return ["SOLVER.AMP.ENABLED", "False"]
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision must be float32 or one of {sorted(PRECISIONS)}, got {precision!r}"
        )
    return ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision]


def native_cpu_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX on x86, the BF16 extension
    on Arm): elsewhere oneDNN emulates it and bfloat16 autocast is slower than float32.

    On x86 the CPU's own flags decide: oneDNN calls bfloat16 "supported" on every AVX-512 CPU
    (Skylake-SP to Ice Lake included), where it is emulated and several times slower.
    """
    try:  # private torch functions: a build without them is taken as having no native bfloat16
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class AutocastTrainer(SimpleTrainer):
    """SimpleTrainer whose forward runs under ``torch.autocast(device_type, dtype)``; the
    backward and the optimizer step run outside it, without loss scaling (meant for bfloat16)."""

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        device_type: str,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__(model, data_loader, optimizer)
        self.device_type = device_type
        self.dtype = dtype

    def run_step(self) -> None:
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_step_trainer(
    cfg: CfgNode, model: torch.nn.Module, data_loader, optimizer: torch.optim.Optimizer
) -> SimpleTrainer:
    """The loop running each training step for ``cfg``: SimpleTrainer (AMP off), detectron2's
    AMPTrainer (float16, CUDA) or :class:`AutocastTrainer` (bfloat16, CUDA or CPU)."""
    dtype = autocast_dtype(cfg)
    if dtype is None:
        return SimpleTrainer(model, data_loader, optimizer)
    if dtype == torch.float16:
        return AMPTrainer(model, data_loader, optimizer)
    return AutocastTrainer(
        model, data_loader, optimizer, device_type=torch.device(cfg.MODEL.DEVICE).type, dtype=dtype
    )
