"""The GPU check's env stage: one JSON line with Python, torch, CUDA and the GPU (if any)."""

import json
import platform

import torch

info = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "gpu": None,
}
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info.update(
        gpu=f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})",
        gpu_count=torch.cuda.device_count(),
        cudnn=torch.backends.cudnn.version(),
        bf16=torch.cuda.is_bf16_supported(),
    )
print(json.dumps(info))
