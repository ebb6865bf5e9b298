"""Checkpointer of the ALB search: detectron2's, with files written whole or not at all.

A search killed while a checkpoint is being written must not leave a truncated ``.pth`` that
``last_checkpoint`` points to (``--resume`` would then fail or load garbage). On local paths the
checkpoint and the ``last_checkpoint`` tag are written to a temporary file in the same folder and
renamed over the target (``os.replace`` is atomic on POSIX); other iopath backends fall back to
the plain write.
"""
import os
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

__all__ = ["SearchCheckpointer"]


def _is_local(path: str) -> bool:
    return "://" not in path


class SearchCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves; remembers the incompatible keys of the last
    model load (``last_incompatible``) so the searcher can tell which parts were initialised."""

    last_incompatible = None

    def _load_model(self, checkpoint: Any):
        self.last_incompatible = super()._load_model(checkpoint)
        return self.last_incompatible

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk or not _is_local(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        PathManager.mkdirs(self.save_dir)
        tmp = save_file + ".tmp"
        try:
            with PathManager.open(tmp, "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        tag = os.path.join(self.save_dir, "last_checkpoint")
        with PathManager.open(tag + ".tmp", "w") as f:
            f.write(last_filename_basename)
        os.replace(tag + ".tmp", tag)
