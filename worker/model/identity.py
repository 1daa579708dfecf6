"""Which weights a model runs, named by where they came from, not by the bytes of a file.

A weights file written on this machine is no identity: safetensors writes its header metadata in
hash-map order (the file's sha256 changes from one save to the next with identical tensors), and
the bicubic resampling inside the DINOv2 conversion differs by 1e-8 between CPU vector paths.
So, as timm's `PretrainedCfg` does, a converted backbone is named by its source (the pinned
package, the source member's own sha256, the same on every machine), the converter's version and
the input size, stamped into the file's metadata under one key and read back by that key. A
foreign checkpoint without that stamp is named by a digest of its tensors (sorted names, dtypes,
shapes and bytes), which does not depend on the container or on header order. A derived copy
(the fp16 bundle for a GPU) names its parent, and modules trained on it belong to the parent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

METADATA_KEY = "sketch_search.identity"  # the stamp in a safetensors file's metadata
BACKBONE_KEY = "sketch_search.backbone"  # in a sketch-modules file: the backbone it was trained for


@dataclass(frozen=True)
class WeightsIdentity:
    """Where a set of weights came from, as a flat JSON object (`kind` says which fields follow)."""

    fields: tuple[tuple[str, object], ...]

    @classmethod
    def of(cls, **fields: object) -> "WeightsIdentity":
        if "kind" not in fields:
            raise ValueError("an identity needs a kind")
        return cls(tuple(sorted(fields.items())))

    @property
    def kind(self) -> str:
        return str(dict(self.fields)["kind"])

    def to_dict(self) -> dict:
        return dict(self.fields)

    def to_json(self) -> str:
        """Canonical form: sorted keys, no spaces (what the digest is taken of)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "WeightsIdentity":
        data = json.loads(text)
        if (not isinstance(data, dict) or "kind" not in data
                or not all(isinstance(v, (str, int, float, bool)) for v in data.values())):
            raise ValueError(f"not a weights identity: {text[:200]!r}")
        return cls.of(**data)

    @property
    def digest(self) -> str:
        """16 hex digits naming this identity in fingerprints and manifests."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def root(self) -> "WeightsIdentity":
        """The identity a derived copy stands in for (itself when it is not derived)."""
        if self.kind != "derived":
            return self
        return WeightsIdentity.from_json(str(dict(self.fields)["parent"])).root()


def converted(source: str, member: str, member_sha256: str, converter: str, timm_name: str,
              img_size: int) -> WeightsIdentity:
    """A backbone converted from a member of a pinned registry package."""
    return WeightsIdentity.of(kind="converted", source=source, member=member, member_sha256=member_sha256,
                              converter=converter, timm_name=timm_name, img_size=img_size)


def derived(parent: WeightsIdentity, how: str) -> WeightsIdentity:
    """A copy made from `parent` (e.g. `how="fp16"`): stands in for it where modules are trained."""
    return WeightsIdentity.of(kind="derived", parent=parent.to_json(), how=how)


def random_init(timm_name: str, img_size: int) -> WeightsIdentity:
    """A randomly initialised backbone (benchmark floor): never equal to trained weights."""
    return WeightsIdentity.of(kind="random", timm_name=timm_name, img_size=img_size)


def tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of sorted names, dtypes, shapes and values: the same for the same tensors in any container."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def of_tensors(state: Mapping[str, torch.Tensor]) -> WeightsIdentity:
    return WeightsIdentity.of(kind="tensors", sha256=tensor_digest(state))


def stamp(identity: WeightsIdentity) -> dict[str, str]:
    """Metadata entries to write into a safetensors file along with its tensors."""
    return {METADATA_KEY: identity.to_json()}


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def read_identity(path: Path, state: Mapping[str, torch.Tensor]) -> WeightsIdentity:
    """The stamped identity of a safetensors file, else the digest of its tensors (`state`: the
    file's tensors, as worker.model.checkpoints read them)."""
    if path.suffix == ".safetensors":
        stamped = safetensors_metadata(path).get(METADATA_KEY)
        if stamped:
            return WeightsIdentity.from_json(stamped)
    return of_tensors(state)
