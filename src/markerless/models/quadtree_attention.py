"""QuadTree attention (variant B) and the QTA-LoFTR coarse transformer, in pure PyTorch.

Why this module exists: upstream QuadTree attention (Tangshitao/QuadTreeAttention) runs two custom CUDA kernels
that often fail to build and have no CPU path. Both kernels are gathers followed by small contractions:

- score computation: ``QK[b, n, f, k, h] = q[b, n, f, h] . key[b, idx[b, n, k, h], h]``
- value aggregation: ``msg[b, n, f, h] = sum_k A[b, n, f, k, h] * value[b, idx[b, n, k, h], h]``

where ``n`` is a parent token, ``f`` one of its four child queries and ``idx`` the parent's candidate keys (the four
children of each of the parent's top-K keys at the coarser level). The four children of a parent share ``idx``, so
keys and values are gathered once per parent (not once per child, as the kernel wrapper's ``repeat`` does), and the
contractions become batched matrix products. The top-k of the finest level, computed and discarded upstream, is
skipped. Names of parameters and their shapes match the released checkpoints (``indoor.ckpt`` / ``outdoor.ckpt``):
see ``docs`` ``qta-loftr.md`` §1 for the algorithm this follows.

Layout: tokens ``[B, N, C]`` in raster order of an ``h x w`` map, ``C = nhead * D`` with channel ``c`` in head
``c // D``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Child offsets of a parent cell, in upstream order (row offset outer, column offset inner): (0,0), (0,1), (1,0), (1,1).
_CHILDREN = ((0, 0), (0, 1), (1, 0), (1, 1))


def _heads(x: torch.Tensor, nhead: int) -> torch.Tensor:
    """``[B, N, C]`` -> ``[B, nhead, N, D]`` (a view)."""
    b, n, c = x.shape
    return x.view(b, n, nhead, c // nhead).transpose(1, 2)


def _pool(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """2x2 average pooling of ``[B, nhead, h*w, E]`` tokens -> ``[B, nhead, (h/2)*(w/2), E]`` (``F.avg_pool2d``).

    Two adds of contiguous halves (row pairs, then column pairs): several times faster on CPU than a mean over
    strided dimensions.
    """
    b, nh, _, e = x.shape
    rows = x.reshape(b, nh, h // 2, 2 * w, e)
    pairs = (rows[:, :, :, :w] + rows[:, :, :, w:]).reshape(b, nh, h // 2, w // 2, 2 * e)
    return ((pairs[..., :e] + pairs[..., e:]) * 0.25).reshape(b, nh, (h // 2) * (w // 2), e)


def _group_children(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Raster ``[B, nh, h*w, E]`` -> grouped by parent ``[B, nh, (h/2)*(w/2), 4, E]`` (child order of ``_CHILDREN``)."""
    b, nh, _, e = x.shape
    x = x.reshape(b, nh, h // 2, 2, w // 2, 2, e).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, nh, (h // 2) * (w // 2), 4, e)


def _ungroup_children(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_group_children`: ``[B, nh, P, 4, E]`` -> raster ``[B, nh, h*w, E]``."""
    b, nh, _, _, e = x.shape
    x = x.reshape(b, nh, h // 2, w // 2, 2, 2, e).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, nh, h * w, e)


def _gather_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[b, h, idx[b, h, ...]]`` for ``table [B, nh, S, E]``, ``idx [B, nh, ...]`` -> ``[B, nh, ..., E]``.

    One flat row lookup (embedding-style) instead of ``torch.gather`` on an index expanded over E: no index copy of
    E times the size, and the fastest gather on both CPU and CUDA.
    """
    b, nh, s, e = table.shape
    offset = (torch.arange(b * nh, device=idx.device) * s).view(b, nh, *([1] * (idx.dim() - 2)))
    return F.embedding(idx + offset, table.reshape(b * nh * s, e))


def _children_index(parent_topk: torch.Tensor, w: int) -> torch.Tensor:
    """Candidate keys at a level of width ``w`` for each parent query: the 4 children of each of its top-K keys.

    ``parent_topk [B, nh, P, K]`` indexes the coarser level (width ``w // 2``); returns ``[B, nh, P, 4K]`` indices
    into this level, K outer and child inner, as upstream.
    """
    row, col = parent_topk.div(w // 2, rounding_mode="floor"), parent_topk.remainder(w // 2)
    base = (2 * row) * w + 2 * col
    offsets = torch.tensor([dy * w + dx for dy, dx in _CHILDREN], device=base.device, dtype=base.dtype)
    return (base.unsqueeze(-1) + offsets).flatten(-2)


class QuadtreeAttentionB(nn.Module):
    """QuadTree-B multi-head attention over a 2x2 average-pooled pyramid (upstream ``QTAttB``, checkpoint ``py_att``).

    The coarsest level attends to all its tokens; each finer level attends, per query, to the children of its
    parent's top-K keys, with a softmax of its own; the per-level messages are upsampled (nearest) to the finest level
    and mixed with the learned weights ``softmax(weight)`` (index 0 = coarsest). Padding masks never enter, as
    upstream.
    """

    def __init__(self, nhead: int, topks: Sequence[int], levels: int = 3) -> None:
        super().__init__()
        if len(topks) != levels:
            raise ValueError(f"topks {list(topks)} must have one entry per pyramid level ({levels})")
        self.nhead = nhead
        self.levels = levels
        self.topks = [int(k) for k in topks]
        self.weight = nn.Parameter(torch.randn(levels))

    def check_size(self, h: int, w: int) -> None:
        """Raise ValueError unless an ``h x w`` token map fits the pyramid and the coarsest top-K."""
        f = 2 ** (self.levels - 1)
        if h % f or w % f:
            raise ValueError(f"QuadTree attention needs a token map divisible by {f}; got {h}x{w}")
        tokens = (h // f) * (w // f)
        if tokens < self.topks[0]:
            raise ValueError(
                f"QuadTree attention top-K {self.topks[0]} exceeds the {tokens} tokens of the coarsest level "
                f"({h // f}x{w // f}) of a {h}x{w} map"
            )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Attention message.

        Args:
            q: projected queries ``[B, h*w, C]``; k, v: projected keys and values ``[B, h*w, C]``.
            h, w: token map size (divisible by ``2 ** (levels - 1)``).

        Returns:
            ``[B, h*w, C]`` messages (before the output projection).
        """
        self.check_size(h, w)
        b, n, c = q.shape
        d = c // self.nhead
        # Pre-scaling q by 1/sqrt(D) equals scaling QK before each softmax.
        qs = [_heads(q, self.nhead) * d**-0.5]
        kvs = [torch.cat([_heads(k, self.nhead), _heads(v, self.nhead)], dim=-1)]  # one gather for K and V
        sizes = [(h, w)]
        for _ in range(self.levels - 1):
            hh, ww = sizes[-1]
            qs.append(_pool(qs[-1], hh, ww))
            kvs.append(_pool(kvs[-1], hh, ww))
            sizes.append((hh // 2, ww // 2))

        # Coarsest level: full attention; its top-K keys seed the next level.
        key, value = kvs[-1].split(d, dim=-1)
        attn = torch.softmax(qs[-1] @ key.transpose(-1, -2), dim=-1)  # [B, nh, S, S]
        weights = torch.softmax(self.weight, dim=0).to(attn.dtype)
        message = (attn @ value) * weights[0]  # [B, nh, S, D]
        topk = attn.topk(self.topks[0], dim=-1).indices  # [B, nh, S, K0]

        for i in range(1, self.levels):
            level = self.levels - 1 - i
            hh, ww = sizes[level]
            cand = _children_index(topk, ww)  # [B, nh, P, 4K]
            kv = _gather_rows(kvs[level], cand)  # [B, nh, P, 4K, 2D]
            key, value = kv.split(d, dim=-1)
            query = _group_children(qs[level], hh, ww)  # [B, nh, P, 4, D]
            attn = torch.softmax(query @ key.transpose(-1, -2), dim=-1)  # [B, nh, P, 4, 4K]
            grouped = message.unsqueeze(3) + (attn @ value) * weights[i]  # coarser message copied to the 4 children
            message = _ungroup_children(grouped, hh, ww)
            if level > 0:  # the finest level's top-k is never used
                local = attn.topk(self.topks[i], dim=-1).indices  # [B, nh, P, 4, K_i]
                chosen = cand.unsqueeze(3).expand(-1, -1, -1, 4, -1).gather(-1, local)
                topk = _ungroup_children(chosen, hh, ww)  # [B, nh, hh*ww, K_i], raster order
        return message.transpose(1, 2).reshape(b, n, c)


class QuadtreeAttention(nn.Module):
    """Projections around :class:`QuadtreeAttentionB`: 1x1-conv q/k/v without bias, linear output projection.

    The projections are 1x1 convolutions in the checkpoint (``(C, C, 1, 1)``); on tokens they are applied as the
    equivalent matrix products, without reshaping to images.
    """

    def __init__(self, d_model: int, nhead: int, topks: Sequence[int], levels: int = 3) -> None:
        super().__init__()
        self.q_proj = nn.Conv2d(d_model, d_model, kernel_size=1, bias=False)
        self.k_proj = nn.Conv2d(d_model, d_model, kernel_size=1, bias=False)
        self.v_proj = nn.Conv2d(d_model, d_model, kernel_size=1, bias=False)
        self.py_att = QuadtreeAttentionB(nhead, topks, levels)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, source: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``x`` attends to ``source`` (both ``[B, h*w, C]``); returns the projected message ``[B, h*w, C]``."""
        c = x.shape[-1]
        wq, wk, wv = (p.weight.view(c, c) for p in (self.q_proj, self.k_proj, self.v_proj))
        if source is x:
            q, k, v = F.linear(x, torch.cat([wq, wk, wv])).split(c, dim=-1)
        else:
            q = F.linear(x, wq)
            k, v = F.linear(source, torch.cat([wk, wv])).split(c, dim=-1)
        return self.proj(self.py_att(q, k, v, h, w))


class DWConv(nn.Module):
    """Depthwise 3x3 convolution on tokens (checkpoint key ``mlp.dwconv.dwconv``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=True)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """``fc1`` -> ReLU -> depthwise 3x3 conv -> GELU -> ``fc2`` (the PVTv2-style MLP of the released "B*" block)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.dwconv(F.relu(self.fc1(x)), h, w)))


class QuadtreeBlock(nn.Module):
    """Pre-norm transformer block of the released QTA-LoFTR models ("QuadTree-B*", upstream issue #16).

    ``x = x + attn(norm1(x), norm1(source))``; ``x = x + mlp(norm2(x))``; the same ``norm1`` normalises both sides.
    """

    def __init__(self, d_model: int, nhead: int, topks: Sequence[int], mlp_ratio: int = 4, levels: int = 3) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = QuadtreeAttention(d_model, nhead, topks, levels)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, d_model * mlp_ratio)

    def forward(self, x: torch.Tensor, source: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``x``, ``source``: ``[B, h*w, C]`` tokens; ``source is x`` for self-attention."""
        xn = self.norm1(x)
        sn = xn if source is x else self.norm1(source)
        x = x + self.attn(xn, sn, h, w)
        return x + self.mlp(self.norm2(x), h, w)


class LocalFeatureTransformer(nn.Module):
    """The coarse QTA-LoFTR transformer: ``QuadtreeBlock`` layers, self and cross, independent weights.

    Cross layers update both images simultaneously (``f0, f1 = L(f0, f1), L(f1, f0)``, upstream's quadtree branch,
    unlike plain LoFTR), so every layer runs once on the two images stacked along the batch.
    """

    def __init__(
        self, d_model: int, nhead: int, layer_names: Sequence[str], topks: Sequence[int], levels: int = 3
    ) -> None:
        super().__init__()
        unknown = [name for name in layer_names if name not in ("self", "cross")]
        if unknown:
            raise ValueError(f"layer names must be 'self' or 'cross'; got {unknown}")
        self.layer_names = list(layer_names)
        self.layers = nn.ModuleList(QuadtreeBlock(d_model, nhead, topks, levels=levels) for _ in layer_names)

    def check_size(self, h: int, w: int) -> None:
        """Raise ValueError unless an ``h x w`` coarse map fits the attention pyramid and top-K."""
        self.layers[0].attn.py_att.check_size(h, w)

    def forward(self, feat0: torch.Tensor, feat1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feat0``, ``feat1``: ``[B, C, h, w]`` maps of the same size -> transformed ``[B, h*w, C]`` tokens each."""
        if feat0.shape != feat1.shape:
            raise ValueError(
                f"both coarse maps must have the same shape; got {tuple(feat0.shape)} and {tuple(feat1.shape)}"
            )
        b, _, h, w = feat0.shape
        self.check_size(h, w)
        x = torch.cat([feat0, feat1]).flatten(2).transpose(1, 2).contiguous()  # [2B, h*w, C]
        for layer, name in zip(self.layers, self.layer_names, strict=True):
            source = x if name == "self" else torch.cat([x[b:], x[:b]])
            x = layer(x, source, h, w)
        return x[:b], x[b:]
