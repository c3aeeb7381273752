"""QuadTree-B attention against a plain per-query loop written from the algorithm's description (qta-loftr.md §1.3).

The loop reference shares no code with the module: it pools with ``F.avg_pool2d`` on images, visits every query of
every head one at a time, builds its candidate list from the parent's top keys, and mixes the levels per output token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from markerless.models.quadtree_attention import (
    LocalFeatureTransformer,
    QuadtreeAttentionB,
    QuadtreeBlock,
)


def loop_quadtree_b(q, k, v, h, w, nhead, topks, level_weight):
    """Reference QuadTree-B: q, k, v ``[B, h*w, C]`` -> ``[B, h*w, C]``, one query at a time."""
    b, n, c = q.shape
    d = c // nhead
    levels = len(topks)

    def pyramid(x):
        img = x.transpose(1, 2).reshape(b, c, h, w)
        maps = [img]
        for _ in range(levels - 1):
            maps.append(F.avg_pool2d(maps[-1], kernel_size=2, stride=2))
        return maps  # finest first

    qp, kp, vp = pyramid(q), pyramid(k), pyramid(v)
    mix = torch.softmax(level_weight, dim=0)
    out = torch.zeros(b, c, h, w, dtype=q.dtype)
    for bi in range(b):
        for hd in range(nhead):
            ch = slice(hd * d, (hd + 1) * d)
            # messages[level][(r, col)] and top keys[level][(r, col)] as (row, col) lists
            messages = {}
            tops = {}
            for li, level in enumerate(range(levels - 1, -1, -1)):  # coarse -> fine
                lh, lw = qp[level].shape[2:]
                msg_l, top_l = {}, {}
                for r in range(lh):
                    for col in range(lw):
                        qv = qp[level][bi, ch, r, col]
                        if li == 0:
                            cands = [(rr, cc) for rr in range(lh) for cc in range(lw)]
                        else:
                            parent_top = tops[level + 1][(r // 2, col // 2)]
                            cands = [(2 * pr + dy, 2 * pc + dx) for pr, pc in parent_top
                                     for dy in (0, 1) for dx in (0, 1)]
                        keys = torch.stack([kp[level][bi, ch, rr, cc] for rr, cc in cands])
                        vals = torch.stack([vp[level][bi, ch, rr, cc] for rr, cc in cands])
                        att = torch.softmax(keys @ qv / d**0.5, dim=0)
                        msg_l[(r, col)] = att @ vals
                        order = torch.argsort(att, descending=True, stable=True)[: topks[li]]
                        top_l[(r, col)] = [cands[j] for j in order.tolist()]
                messages[level], tops[level] = msg_l, top_l
            for r in range(h):
                for col in range(w):
                    total = torch.zeros(d, dtype=q.dtype)
                    for li, level in enumerate(range(levels - 1, -1, -1)):
                        total = total + mix[li] * messages[level][(r >> level, col >> level)]
                    out[bi, ch, r, col] = total
    return out.flatten(2).transpose(1, 2)


@pytest.mark.parametrize(
    ("batch", "h", "w", "nhead", "topks"),
    [
        (1, 8, 8, 2, [2, 4, 4]),
        (2, 8, 12, 4, [4, 8, 8]),
        (1, 16, 12, 2, [8, 16, 16]),
        (1, 12, 16, 8, [12, 3, 5]),
    ],
)
def test_matches_loop_reference(batch, h, w, nhead, topks):
    gen = torch.Generator().manual_seed(h * 100 + w + nhead)
    c = nhead * 8
    q, k, v = (torch.randn(batch, h * w, c, generator=gen, dtype=torch.float64) for _ in range(3))
    att = QuadtreeAttentionB(nhead, topks).double()
    with torch.no_grad():
        att.weight.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
        got = att(q, k, v, h, w)
        want = loop_quadtree_b(q, k, v, h, w, nhead, topks, att.weight)
        got32 = att.float()(q.float(), k.float(), v.float(), h, w)
    assert got.shape == (batch, h * w, c)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got32.double() - want).abs().max().item() <= 1e-5


def test_topk_changes_the_result():
    """The fine levels really restrict the keys: a smaller top-K gives a different message."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16 * 16, 32, generator=gen) for _ in range(3))
    small, large = QuadtreeAttentionB(4, [2, 2, 2]), QuadtreeAttentionB(4, [16, 16, 16])
    with torch.no_grad():
        large.weight.copy_(small.weight)
        assert (small(q, k, v, 16, 16) - large(q, k, v, 16, 16)).abs().max() > 1e-3


def test_sizes_that_do_not_fit_raise_value_error():
    att = QuadtreeAttentionB(2, [8, 4, 4])
    x = torch.randn(1, 8 * 6, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        att(x, x, x, 8, 6)
    x = torch.randn(1, 8 * 4, 16)
    with pytest.raises(ValueError, match="top-K 8 exceeds the 2 tokens"):
        att(x, x, x, 8, 4)


def test_stack_updates_cross_layers_simultaneously():
    """The batched stack equals per-image calls with f0, f1 = L(f0, f1), L(f1, f0), not LoFTR's sequential update."""
    torch.manual_seed(0)
    stack = LocalFeatureTransformer(32, 4, ["self", "cross"], [4, 4, 4]).eval()
    f0, f1 = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        out0, out1 = stack(f0, f1)
        t0, t1 = (f.flatten(2).transpose(1, 2) for f in (f0, f1))
        selfl, crossl = stack.layers
        t0, t1 = selfl(t0, t0, 8, 8), selfl(t1, t1, 8, 8)
        s0 = crossl(t0, t1, 8, 8)
        simultaneous1 = crossl(t1, t0, 8, 8)
        sequential1 = crossl(t1, s0, 8, 8)
    torch.testing.assert_close(out0, s0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1, simultaneous1, atol=1e-5, rtol=1e-5)
    assert (out1 - sequential1).abs().max() > 1e-3


def test_block_parameter_names_and_shapes():
    block = QuadtreeBlock(256, 8, [16, 8, 8])
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {
        "norm1.weight": (256,),
        "norm1.bias": (256,),
        "attn.q_proj.weight": (256, 256, 1, 1),
        "attn.k_proj.weight": (256, 256, 1, 1),
        "attn.v_proj.weight": (256, 256, 1, 1),
        "attn.py_att.weight": (3,),
        "attn.proj.weight": (256, 256),
        "attn.proj.bias": (256,),
        "norm2.weight": (256,),
        "norm2.bias": (256,),
        "mlp.fc1.weight": (1024, 256),
        "mlp.fc1.bias": (1024,),
        "mlp.dwconv.dwconv.weight": (1024, 1, 3, 3),
        "mlp.dwconv.dwconv.bias": (1024,),
        "mlp.fc2.weight": (256, 1024),
        "mlp.fc2.bias": (256,),
    }
