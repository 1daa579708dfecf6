"""Reading and writing weights files: every checkpoint the worker loads or writes goes through here.

Identities (worker.model.identity) are read from the files here and handed to the model, which
never opens a file itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from worker.errors import InputError
from worker.model import identity as ids

SKETCH_MODULE_PARTS = ("tokenizer", "adapter", "scorer")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch checkpoint (weights only: no pickle execution)."""
    if not path.exists():
        raise InputError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except IsADirectoryError:
        raise not_a_checkpoint(path) from None
    except OSError as exc:  # the file's access or disk, not its kind
        raise InputError(f"weights file {path} cannot be read: {exc.strerror or exc}") from None
    except MemoryError:
        raise
    except Exception:  # torch's own words on a pickle of other objects advise loading it unsafely: not repeated
        raise not_a_checkpoint(path) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise not_a_checkpoint(path)
    return state


def not_a_checkpoint(path: Path) -> InputError:
    """A weights file that is not one (an image, a truncated download, a pickle of other things)."""
    return InputError(f"{path} is not a readable checkpoint (a .safetensors file, or a torch state dict of tensors): "
                      "name the weights file itself")


def save_safetensors(state: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write tensors and metadata atomically (a crash leaves the old file or none)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # readable by all, as the other files of a cache several users may share
    os.replace(tmp, path)


def load_backbone_weights(path: Path) -> tuple[dict[str, torch.Tensor], ids.WeightsIdentity]:
    """A backbone checkpoint and its identity (stamped, or the digest of its tensors)."""
    state = load_state_dict_file(path)
    return state, ids.read_identity(path, state)


def save_sketch_modules(state: Mapping[str, torch.Tensor], path: Path, backbone: ids.WeightsIdentity,
                        extra: dict[str, str] | None = None) -> ids.WeightsIdentity:
    """Write trained sketch modules stamped with their own identity (a digest of their tensors)
    and the backbone they were trained for (the root of a derived copy: modules trained on the
    fp16 bundle belong to the fp32 backbone it was made from)."""
    own = ids.of_tensors(state)
    save_safetensors(state, path, {**(extra or {}), **ids.stamp(own), ids.BACKBONE_KEY: backbone.root().to_json()})
    return own


def load_sketch_modules(path: Path, backbone: ids.WeightsIdentity) -> tuple[dict[str, torch.Tensor], ids.WeightsIdentity]:
    """Trained sketch modules and their identity; refused when trained for another backbone."""
    if not path.exists():
        raise InputError(f"sketch modules checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: sketch modules are read from .safetensors files (written by scripts/train)")
    try:
        meta = ids.safetensors_metadata(path)
    except Exception:  # safetensors' SafetensorError: a file too short, or of another kind
        raise not_a_checkpoint(path) from None
    trained_for = meta.get(ids.BACKBONE_KEY)
    if trained_for is None:
        raise InputError(f"{path} does not say which backbone it was trained for; retrain it with scripts/train")
    want = backbone.root()
    got = ids.WeightsIdentity.from_json(trained_for).root()
    if got != want:
        raise InputError(f"{path} was trained for backbone {got.to_json()}, not {want.to_json()}: "
                         "retrain it with scripts/train for this backbone, or pass --sketch-modules none")
    state = load_state_dict_file(path)
    return state, ids.read_identity(path, state)
