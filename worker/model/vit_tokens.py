"""Run a timm ViT block by block, exposing the CLS attention that guides token filtering.

timm's fused attention hides attention weights; here each block is run with its own modules,
computing only the CLS row of the attention map in addition (cheap: one row, not N x N).
Filtering follows EViT / the paper: drop the patch tokens the CLS attends to least, after the
attention update of the block and before its MLP (the authors' release returned the
pre-attention input in that branch; here the updated tokens are kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenOutput:
    """Final normalised tokens: cls (B, D), patches (B, K, D), their patch indices (B, K),
    and the last block's CLS attention over the kept patches, averaged over heads (B, K)."""

    cls: torch.Tensor
    patches: torch.Tensor
    positions: torch.Tensor
    cls_attention: torch.Tensor


def _attention_with_cls_row(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cls_row = torch.softmax((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1), dim=-1)  # B,H,1,N
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, n, c)
    out = attn.proj(attn.norm(out))
    return out, cls_row.mean(1)[:, 0, 1:]  # CLS attention over patch tokens, mean over heads


def keep_top_tokens(x: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
                    keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the CLS token and the `keep` patch tokens with the highest scores (ties by position)."""
    keep = max(1, min(keep, scores.shape[1]))
    idx = torch.topk(scores, keep, dim=1, sorted=True).indices
    patches = torch.gather(x[:, 1:], 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return (torch.cat([x[:, :1], patches], 1), torch.gather(positions, 1, idx),
            torch.gather(scores, 1, idx))


def forward_tokens(vit: nn.Module, patch_tokens: torch.Tensor, prune_layers: tuple[int, ...] = (),
                   keep_rate: float = 1.0, final_keep: int | None = None) -> TokenOutput:
    """Run the ViT from patch-embedded tokens (B, N, D) with optional attention-guided filtering.

    prune_layers: block indices after whose attention `keep_rate` of the patch tokens survive.
    final_keep: how many patch tokens to return, chosen by the last block's CLS attention.
    """
    x = vit.norm_pre(vit._pos_embed(patch_tokens))
    b, n = x.shape[0], x.shape[1] - 1
    positions = torch.arange(n, device=x.device).expand(b, n)
    cls_attn = torch.zeros(b, n, device=x.device)
    last = len(vit.blocks) - 1
    for i, block in enumerate(vit.blocks):
        out, cls_attn = _attention_with_cls_row(block.attn, block.norm1(x))
        x = x + block.drop_path1(block.ls1(out))
        if i in prune_layers and i != last:
            keep = int(round(keep_rate * (x.shape[1] - 1)))
            x, positions, cls_attn = keep_top_tokens(x, positions, cls_attn, keep)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    x = vit.norm(x)
    if final_keep is not None and final_keep < x.shape[1] - 1:
        x, positions, cls_attn = keep_top_tokens(x, positions, cls_attn, final_keep)
    return TokenOutput(cls=x[:, 0], patches=x[:, 1:], positions=positions, cls_attention=cls_attn)
