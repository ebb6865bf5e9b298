"""AtomicCheckpointer: detectron2's checkpointer made safe to interrupt, to resume and to load.

- Files are written to a temporary name then renamed, so a process killed mid-save never leaves a
  half-written checkpoint or ``last_checkpoint``.
- Every checkpoint of a model with a fixed ALB head stores its genotype (``alb_genotype``); loading
  it into a head of another genotype is an error naming both (weight names do not encode the
  structure, so the load would otherwise succeed into a different network). The entry and the
  check are ``elixir_d2/modeling/genotype_source.py``'s; this module only calls them.
- ``--resume`` whose ``last_checkpoint`` names a missing file falls back to the newest complete
  ``model_*.pth`` in the folder, with a warning.
- ``.pth`` files load with ``torch.load(weights_only=True)`` (``elixir_d2.checkpoint_file``) and
  detectron2's ``.pkl`` model-zoo weights through a restricted unpickler
  (``elixir_d2.safe_pickle``): no checkpoint can run code.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import tempfile
import zipfile
from typing import Any, Callable, Dict, List, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer

from .checkpoint_file import CheckpointError, load_pth
from .cli import MissingFileError, UserInputError, escape_name
from .modeling.genotype_source import check_checkpoint_genotype, genotype_checkpoint_entry
from .safe_pickle import load_weights_pickle

__all__ = ["AtomicCheckpointer", "CheckpointError", "last_checkpoint_target"]


def _is_step_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``: a step count, not a weight."""
    return key.endswith("num_batches_tracked")


def last_checkpoint_target(save_dir: str) -> str:
    """The path the ``last_checkpoint`` tag of ``save_dir`` names ("" without a tag). It must name
    a file inside ``save_dir`` (the checkpointer writes a bare file name); anything else is a
    :class:`elixir_d2.cli.UserInputError` naming the tag, never a load of whatever it points at."""
    tag = os.path.join(save_dir, "last_checkpoint")
    try:
        with open(tag, "rb") as f:
            raw = f.read(4097)
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise UserInputError(
            f"{escape_name(tag)} cannot be read ({e.strerror or e}); delete it "
            "or run without --resume"
        ) from e
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    root = os.path.realpath(save_dir)
    target = os.path.realpath(os.path.join(save_dir, name))
    if (
        not name
        or len(raw) > 4096
        or os.path.dirname(target) != root
        or os.path.basename(name) != name
    ):
        shown = escape_name(raw[:80].decode("utf-8", "backslashreplace").strip())
        raise UserInputError(
            f"{escape_name(tag)} names {shown!r}, which is not a file name "
            f"inside {escape_name(save_dir)} (outside the output folder, or not "
            "a name); delete it to start from MODEL.WEIGHTS, or fix it"
        )
    return os.path.join(save_dir, name)


_ITER_NAME = re.compile(r"model_(\d+|final)\.pth$")


def complete_checkpoints(folder: str) -> List[str]:
    """``model_*.pth`` files of ``folder`` that are whole torch zip archives, newest (highest
    iteration, model_final first) first."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = _ITER_NAME.fullmatch(name)
        path = os.path.join(folder, name)
        if m and zipfile.is_zipfile(path):  # a truncated archive has no central directory
            found.append((float("inf") if m.group(1) == "final" else int(m.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def _short_host() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def _temp_prefix() -> str:
    # The writer's pid and host in the name let a later run tell a dead writer's leftover from a
    # file being written right now ('.' and '@' never occur in mkstemp's random part).
    return f".tmp_{os.getpid()}@{_short_host()}."


def _is_stale_temp(name: str) -> bool:
    """A temporary checkpoint file whose writer, a process on this host, no longer exists."""
    m = re.match(r"\.tmp_(\d+)@([^.]*)\.", name)
    if not m or m.group(2) != _short_host():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer writing to a temporary file then renaming it into place.

    ``.pth`` files are loaded with ``torch.load(weights_only=True)`` and ``.pkl`` model-zoo files
    through a restricted unpickler: a checkpoint cannot run code. See the module docstring for
    the genotype check and the resume fallback.
    A process killed mid-write leaves only a ``.tmp_<pid>@<host>.*`` file, removed (and logged) by
    the next save in that folder once process <pid> on this host is gone. Loading a checkpoint
    that does not fit the model logs one summary line (counts and first keys) after detectron2's
    per-key warnings, and one that shares no tensor with the model is an error.
    """

    _cleaned_dirs: Optional[set] = None

    def _remove_stale_temp_files(self, folder: str) -> None:
        # Once per folder and checkpointer: a live writer's temp file is never touched.
        if self._cleaned_dirs is None:
            self._cleaned_dirs = set()
        if folder in self._cleaned_dirs:
            return
        self._cleaned_dirs.add(folder)
        stale = [n for n in sorted(os.listdir(folder)) if _is_stale_temp(n)]
        for name in stale:
            os.remove(os.path.join(folder, name))
        if stale:
            self.logger.warning(
                f"Removed {len(stale)} partial checkpoint file(s) of killed runs "
                f"in {folder}: {stale}"
            )

    def load(self, path: str, checkpointables: Optional[list] = None) -> Dict[str, Any]:
        self._loading = path  # named in the mismatch summary
        if path and "://" not in path and not os.path.isfile(path):
            raise MissingFileError(
                f"weights file {path} not found (MODEL.WEIGHTS / --weights); give a checkpoint "
                "written by train_net.py, or leave MODEL.WEIGHTS empty to start from scratch"
            )
        return super().load(path, checkpointables)

    def get_checkpoint_file(self) -> str:
        """The file ``last_checkpoint`` names (a file in the output folder, else an error);
        if it is gone, the newest complete ``model_*.pth``."""
        local = self.path_manager.get_local_path(self.save_dir) if self.save_dir else ""
        path = (
            last_checkpoint_target(self.save_dir)
            if local and os.path.isdir(local)
            else super().get_checkpoint_file()
        )
        if not path or self.path_manager.exists(path) or not os.path.isdir(self.save_dir):
            return path
        tag = os.path.join(self.save_dir, "last_checkpoint")
        candidates = complete_checkpoints(self.save_dir)
        if not candidates:
            raise MissingFileError(
                f"{tag} names {os.path.basename(path)}, which is missing, and no complete "
                f"model_*.pth is left in {self.save_dir}: delete {tag} to start from "
                "MODEL.WEIGHTS, or run without --resume"
            )
        self.logger.warning(
            f"{tag} names {os.path.basename(path)}, which is missing; resuming "
            f"from {os.path.basename(candidates[0])}, the newest complete "
            "checkpoint there"
        )
        return candidates[0]

    def _load_model(self, checkpoint: Any):
        check_checkpoint_genotype(checkpoint, self.model, getattr(self, "_loading", "?"))
        state = checkpoint.get("model", {})
        heuristics = checkpoint.get("matching_heuristics", False)  # detectron2 renames .pkl keys
        num_in_checkpoint = len(state) if isinstance(state, dict) else 0
        first_keys = sorted(state)[:3] if isinstance(state, dict) else []
        num_weights = sum(not _is_step_counter(k) for k in state) if num_in_checkpoint else 0
        incompatible = super()._load_model(checkpoint)
        # Checkpoint weights that went into the model: neither unknown to it nor of another shape.
        # BatchNorm step counters are left out of every count of the summary: torch sets a missing
        # one to 0 without reporting it, so counting them would leave the figures unbalanced.
        unexpected = sum(not _is_step_counter(k) for k in incompatible.unexpected_keys)
        self._num_loaded = num_weights - unexpected - len(incompatible.incorrect_shapes)
        if num_in_checkpoint and self._num_loaded <= 0 and not heuristics:
            model_keys = list(self.model.state_dict())
            raise ValueError(
                f"Checkpoint {getattr(self, '_loading', '?')} does not belong to this model: none "
                f"of its {num_in_checkpoint} tensors matches one of the model's {len(model_keys)} "
                f"by name and shape (checkpoint keys start {first_keys}, model keys start "
                f"{model_keys[:3]})"
            )
        return incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        super()._log_incompatible_keys(incompatible)
        shapes = incompatible.incorrect_shapes
        reshaped = {k for k, _, _ in shapes}
        missing = [
            k for k in incompatible.missing_keys if k not in reshaped and not _is_step_counter(k)
        ]
        unexpected = [k for k in incompatible.unexpected_keys if not _is_step_counter(k)]
        if not (missing or unexpected or shapes):
            return
        total = sum(not _is_step_counter(k) for k in self.model.state_dict())
        parts = [
            f"{min(getattr(self, '_num_loaded', 0), total)} of the model's {total} tensors loaded"
        ]
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint (first: {missing[:3]})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} in the checkpoint but not in the model (first: "
                f"{unexpected[:3]})"
            )
        if shapes:
            k, s_ckpt, s_model = shapes[0]
            parts.append(
                f"{len(shapes)} of another shape, skipped (first: {k} {s_ckpt} in the "
                f"checkpoint, {s_model} in the model)"
            )
        self.logger.warning(
            f"Checkpoint {getattr(self, '_loading', '?')} does not match the "
            "model: " + "; ".join(parts)
        )

    def _atomic_write(self, path: str, write: Callable[[Any], None], mode: str) -> None:
        local = self.path_manager.get_local_path(os.path.dirname(path) or ".")
        if not os.path.isdir(local):  # non-local backend: no rename; plain write
            with self.path_manager.open(path, mode) as f:
                write(f)
            return
        self._remove_stale_temp_files(local)
        fd, tmp = tempfile.mkstemp(dir=local, prefix=_temp_prefix(), suffix=os.path.basename(path))
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(local, os.path.basename(path)))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data.update(genotype_checkpoint_entry(self.model))
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._atomic_write(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        self._atomic_write(path, lambda f: f.write(last_filename_basename), "w")

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            return self._load_pkl(filename)
        loaded = load_pth(filename, self.path_manager)
        return loaded if "model" in loaded else {"model": loaded}

    def _load_pkl(self, filename: str) -> Dict[str, Any]:
        # detectron2's DetectionCheckpointer._load_file, with the restricted unpickler.
        try:
            with self.path_manager.open(filename, "rb") as f:
                data = load_weights_pickle(f, filename)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                str(e)
                if "asks to load" in str(e)
                else f"Weights file {filename} is not a readable pickle ({e})"
            ) from e
        except (EOFError, ValueError, TypeError) as e:
            raise CheckpointError(f"Weights file {filename} is unreadable (truncated?): {e}") from e
        if not isinstance(data, dict):
            raise CheckpointError(
                f"Weights file {filename} holds a {type(data).__name__}, not a dict of arrays"
            )
        if "model" in data and "__author__" in data:  # detectron2 model-zoo format
            self.logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        if "blobs" in data:  # Caffe2 / Detectron1 detection models
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
