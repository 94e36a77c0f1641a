"""Adversarial audit of the newest discovery rules: table lookups spelt other ways (``p[ids, :]``,
a list of ints, views and transposes of the table), products of a parameter with a transposed
parameter read as ``F.linear``, gathers on a parameter by a data-dependent index, and ``topk`` /
``sort``. Each model below is discovered on one example, moved by a random gauge, and compared
on several fresh inputs (other ids, batch sizes, lengths and values, inputs for which ``topk``
picks other entries): every found generator keeps the function, exactly in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL, SCALE = torch.float64, 1e-10, 2.0
V, D, H, L, E = 7, 5, 6, 3, 4  # table rows, width, hidden, latents, product outputs
SEEDS = (1, 2, 3)


class Model(nn.Module):
    """Parameters of the given shapes (random float64) and a forward ``fn(self, *inputs)``."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], fn: Callable[..., Any]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, shape in shapes.items():
            self.register_parameter(
                name, nn.Parameter(torch.randn(*shape, generator=gen, dtype=DTYPE))
            )
        self.fn = fn

    def forward(self, *inputs: Tensor) -> Any:
        return self.fn(self, *inputs)


def ids(seed: int, rows: int = V) -> tuple[Tensor]:
    """Token ids ``[B, T]`` in ``[0, rows)``, the batch and length varying with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, rows, (1 + seed % 3, 2 + seed % 4), generator=gen),)


def floats(width: int) -> Callable[[int], tuple[Tensor]]:
    def make(seed: int) -> tuple[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(1 + seed % 4, width, generator=gen, dtype=DTYPE),)

    return make


def seqs(width: int) -> Callable[[int], tuple[Tensor]]:
    def make(seed: int) -> tuple[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(1 + seed % 3, 2 + seed % 4, width, generator=gen, dtype=DTYPE),)

    return make


MLP = {"fc": (H, D), "pr": (D, H)}


def mlp(m: Model, e: Tensor) -> Tensor:
    """``pr(relu(fc(e)))``: hidden channels a generator can rescale."""
    return F.linear(F.relu(F.linear(e, m.fc)), m.pr)


T = {"p": (V, D), **MLP}  # a table and an MLP reading its rows
TH = {"p": (V, D), "fc": (H, D)}  # a table, an MLP whose head is the tied table
PROD = {"lat": (L, D), "w": (E, D), "b": (E,), "k": (E, D)}


def att(m: Model, q: Tensor, x: Tensor) -> Tensor:
    """Scores of the learned queries ``q [L, E]`` against keys ``relu(x @ k.T)`` of the data."""
    return F.relu(F.linear(x, m.k)) @ q.T


def picks(m: Model, x: Tensor) -> Tensor:
    """Per row of ``x [B, D]``, two column places in ``[0, D)`` picked by its values."""
    return x.topk(2, dim=-1).indices


# name -> (parameter shapes, forward, inputs for a seed)
CASES: dict[str, tuple[dict, Callable[..., Any], Callable[[int], tuple]]] = {
    # -- table lookups ----------------------------------------------------------------------------
    "F.embedding(ids, p)": (T, lambda m, i: mlp(m, F.embedding(i, m.p)), ids),
    "p[ids, :]": (T, lambda m, i: mlp(m, m.p[i, :]), ids),
    "p[ids, ...]": (T, lambda m, i: mlp(m, m.p[i, ...]), ids),
    "p[(ids,)]": (T, lambda m, i: mlp(m, m.p[(i,)]), ids),
    "p[ids.int()]": (T, lambda m, i: mlp(m, m.p[i.int(), :]), ids),
    "p[[2,0,1]] + x": (
        T,
        lambda m, x: mlp(m, m.p[[2, 0, 1]] + x),
        lambda s: (floats(D)(s)[0][:1],),
    ),
    "p[[2,0,-1,2]] + x": (
        T,
        lambda m, x: mlp(m, m.p[[2, 0, -1, 2]] + x),
        lambda s: (floats(D)(s)[0][:1],),
    ),
    "p[[B-1]]": (T, lambda m, x: mlp(m, m.p[[x.shape[0] - 1]] * x), floats(D)),
    "p[[B-1, 0]]": (T, lambda m, x: mlp(m, m.p[[x.shape[0] - 1, 0], :].sum(0) * x), floats(D)),
    "p[arange(T)]": (T, lambda m, x: mlp(m, m.p[torch.arange(x.shape[1])] + x), seqs(D)),
    "p[tensor([1, 2])]": (
        T,
        lambda m, x: mlp(m, m.p[torch.tensor([1, 2])] + x),
        lambda s: (floats(D)(s)[0][:1],),
    ),
    "p[ids] + p[0]": (T, lambda m, i: mlp(m, m.p[i, :] + m.p[0]), ids),
    "p[ids] * p[0]": (T, lambda m, i: mlp(m, m.p[i, :] * m.p[0]), ids),
    "p[ids] * p.sum()": (T, lambda m, i: mlp(m, m.p[i, ...] * m.p.sum()), ids),
    "(p * 2)[ids]": (T, lambda m, i: mlp(m, (m.p * 2)[i] + m.p[i, :]), ids),
    "p[ids] / p.norm(dim=1)[ids]": (
        T,
        lambda m, i: mlp(m, m.p[i, :] / m.p.norm(dim=1)[i, None]),
        ids,
    ),
    "p[ids] * p.norm(dim=0)": (T, lambda m, i: mlp(m, m.p[i, :] * m.p.norm(dim=0)), ids),
    "tied head h @ p.T": (TH, lambda m, i: F.relu(F.linear(m.p[i, :], m.fc)) @ m.fc @ m.p.T, ids),
    "tied head p[ids] @ p.T": (T, lambda m, i: mlp(m, m.p[i, :]) @ m.p.T, ids),
    "p.view(V, D)[ids]": (T, lambda m, i: mlp(m, m.p.view(V, D)[i]), ids),
    "p.view(D, V)[ids]": (
        {"p": (V, D), "fc": (H, V), "pr": (D, H)},
        lambda m, i: F.linear(F.relu(F.linear(m.p.view(D, V)[i], m.fc)), m.pr),
        lambda s: ids(s, D),
    ),
    "p.view(D, V)[ids] and p[ids]": (
        {"p": (V, D), "fc": (H, V), "pr": (D, H)},
        lambda m, i: F.linear(F.relu(F.linear(m.p.view(D, V)[i], m.fc)), m.pr) + m.p[i],
        lambda s: ids(s, D),
    ),
    "p.view(D, V)[ids] and mlp(p[ids])": (
        {"p": (V, D), "fc": (H, D), "pr": (D, H), "g": (H, V)},
        lambda m, i: (
            mlp(m, m.p[i]).sum(-1, keepdim=True) * F.relu(F.linear(m.p.view(D, V)[i], m.g))
        ),
        lambda s: ids(s, D),
    ),
    "p.t().contiguous().view(V, D)[ids]": (
        {"p": (D, V), **MLP},
        lambda m, i: mlp(m, m.p.t().contiguous().view(V, D)[i]),
        ids,
    ),
    "p.t().reshape(V, D)[ids] and F.linear(x, p)": (
        {"p": (D, V), **MLP},
        lambda m, i: mlp(m, m.p.t().reshape(V, D)[i]) @ m.p,
        ids,
    ),
    "p.unfold(0, 2, 1)[ids]": (
        T,
        lambda m, i: mlp(m, m.p.unfold(0, 2, 1)[i].sum(-1)),
        lambda s: ids(s, V - 1),
    ),
    "p.as_strided[ids]": (
        T,
        lambda m, i: mlp(m, m.p.as_strided((V - 1, D), (D, 1))[i]),
        lambda s: ids(s, V - 1),
    ),
    "p.as_strided overlap[ids]": (T, lambda m, i: mlp(m, m.p.as_strided((V, D), (1, 1))[i]), ids),
    "p3.flatten(0, 1)[ids]": (
        {"p": (V, 2, D), **MLP},
        lambda m, i: mlp(m, m.p.flatten(0, 1)[i]),
        lambda s: ids(s, 2 * V),
    ),
    "p3.flatten(1, 2)[ids]": (
        {"p": (V, 2, 3), "fc": (H, 6), "pr": (D, H)},
        lambda m, i: mlp(m, m.p.flatten(1, 2)[i]),
        ids,
    ),
    "p3.transpose(0, 1).flatten(0, 1)[ids]": (
        {"p": (2, V, D), **MLP},
        lambda m, i: mlp(m, m.p.transpose(0, 1).reshape(2 * V, D)[i]),
        lambda s: ids(s, 2 * V),
    ),
    "p.T[ids]": ({"p": (D, V), **MLP}, lambda m, i: mlp(m, m.p.T[i]), ids),
    "p.T[ids] square": ({"p": (D, D), **MLP}, lambda m, i: mlp(m, m.p.T[i]), lambda s: ids(s, D)),
    "p.T[ids] square and p[ids]": (
        {"p": (D, D), **MLP},
        lambda m, i: mlp(m, m.p.T[i]) + mlp(m, m.p[i]),
        lambda s: ids(s, D),
    ),
    "p.T[ids] and F.linear(h, p)": (
        {"p": (D, V), "fc": (H, D), "pr": (V, H)},
        lambda m, i: F.linear(F.relu(F.linear(m.p.T[i], m.fc)), m.pr) @ m.p.T,
        ids,
    ),
    "p.T.T[ids]": (T, lambda m, i: mlp(m, m.p.T.T[i]), ids),
    "p.flip(0)[ids]": (T, lambda m, i: mlp(m, m.p.flip(0)[i]), ids),
    "p.flip(1)[ids]": (T, lambda m, i: mlp(m, m.p.flip(1)[i]) + m.p[i], ids),
    "p.roll(1, 1)[ids]": (T, lambda m, i: mlp(m, m.p.roll(1, 1)[i]) * m.p[i], ids),
    "p1.view(V, D)[ids]": ({"p": (V * D,), **MLP}, lambda m, i: mlp(m, m.p.view(V, D)[i]), ids),
    "p1.view(D, V)[ids] and p1.view(V, D)[ids]": (
        {"p": (V * D,), **MLP, "g": (H, V)},
        lambda m, i: (
            mlp(m, m.p.view(V, D)[i]).sum(-1, keepdim=True)
            * F.relu(F.linear(m.p.view(D, V)[i % D], m.g))
        ),
        ids,
    ),
    "p.unsqueeze(0)[0][ids]": (T, lambda m, i: mlp(m, m.p.unsqueeze(0)[0][i]), ids),
    "p.expand(2, V, D)[1][ids]": (T, lambda m, i: mlp(m, m.p.expand(2, V, D)[1][i]), ids),
    "p.index_select(0, ids)": (T, lambda m, i: mlp(m, m.p.index_select(0, i.flatten())), ids),
    "p[ids] twice": (T, lambda m, i: mlp(m, m.p[i, :] + m.p[i.flip(-1), ...]), ids),
    "p[ids][..., :3]": (T, lambda m, i: mlp(m, F.pad(m.p[i][..., :3], (0, 2))), ids),
    "p[ids, :3]": (T, lambda m, i: mlp(m, F.pad(m.p[i, :3], (0, 2))), ids),
    "p[:, ids]": ({"p": (D, V), **MLP}, lambda m, i: mlp(m, m.p[:, i].movedim(0, -1)), ids),
    "p[ids] with ids from a product": (
        {"p": (V, D), "q": (V, D), **MLP},
        lambda m, x: mlp(m, m.p[(x @ m.q.T).argmax(-1)]),
        floats(D),
    ),
    "p[ids] with ids from p": (T, lambda m, x: mlp(m, m.p[(x @ m.p.T).argmax(-1), :]), floats(D)),
    "p.detach()[ids] and p[ids]": (T, lambda m, i: mlp(m, m.p.detach()[i] + m.p[i]), ids),
    "F.linear(x, p) and p[ids]": (
        {"p": (V, D), **MLP},
        lambda m, i: mlp(m, m.p[i, :]).sum(-1, keepdim=True) + F.linear(F.relu(m.p[i]), m.p),
        ids,
    ),
    "g[[2, 0, 1]] gain": (
        {"g": (H,), **MLP},
        lambda m, x: F.linear(F.relu(F.linear(x, m.fc))[:, :3] * m.g[[2, 0, 1]], m.pr[:, :3]),
        floats(D),
    ),
    "g[[0, 0, -1]] gain": (
        {"g": (3,), "fc": (H, D), "pr": (D, 3)},
        lambda m, x: F.linear(F.relu(F.linear(x, m.fc))[:, :3] * m.g[[0, 0, -1]], m.pr),
        floats(D),
    ),
    "g[[2, 0, 1]] bias": (
        {"g": (H,), **MLP},
        lambda m, x: F.linear(F.relu(F.linear(x, m.fc) + m.g[[5, 4, 3, 2, 1, 0]]), m.pr),
        floats(D),
    ),
    "w3[[1, 0, 1]] @ x": (
        {"w": (2, H, D), "pr": (D, H)},
        lambda m, x: F.linear(F.relu(m.w[[1, 0, 1], :] @ x.T[None]).sum(0).T, m.pr),
        floats(D),
    ),
    "w3[[-1]] @ x": (
        {"w": (2, H, D), "pr": (D, H)},
        lambda m, x: F.linear(F.relu(m.w[[-1], ...] @ x.T[None])[0].T, m.pr),
        floats(D),
    ),
    "w3[ids, :] per token": (
        {"w": (V, H, D), "pr": (D, H)},
        lambda m, i: F.linear(
            F.relu(m.w[i.flatten(), :] @ torch.ones(D, 1, dtype=DTYPE))[..., 0], m.pr
        ),
        ids,
    ),
    "weight_norm table lookup": (
        {"v": (V, D), "g": (V, 1), **MLP},
        lambda m, i: mlp(m, torch._weight_norm(m.v, m.g, 0)[i, :]),
        ids,
    ),
    "weight_norm(dim=1) table lookup": (
        {"v": (V, D), "g": (1, D), **MLP},
        lambda m, i: mlp(m, torch._weight_norm(m.v, m.g, 1)[i, ...]),
        ids,
    ),
    "weight_norm(dim=1) table .T lookup": (
        {"v": (D, V), "g": (1, V), **MLP},
        lambda m, i: mlp(m, torch._weight_norm(m.v, m.g, 1).T[i]),
        ids,
    ),
    "p[ids] of a [V, 1] expanded": (
        {"p": (V, 1), **MLP},
        lambda m, i: mlp(m, m.p.expand(V, D)[i]),
        ids,
    ),
    "p[ids] of a [1, D] expanded": (
        {"p": (1, D), **MLP},
        lambda m, i: mlp(m, m.p.expand(V, D)[i]),
        ids,
    ),
    "p[:, :3][ids]": (T, lambda m, i: mlp(m, F.pad(m.p[:, :3][i], (0, 2))), ids),
    "p.narrow(1, 0, 3)[ids]": (T, lambda m, i: mlp(m, F.pad(m.p.narrow(1, 0, 3)[i], (0, 2))), ids),
    "p[1:][ids]": (T, lambda m, i: mlp(m, m.p[1:][i]), lambda s: ids(s, V - 1)),
    "p.diag()[ids]": (
        {"p": (D,), **MLP},
        lambda m, i: mlp(m, torch.diag(m.p)[i]),
        lambda s: ids(s, D),
    ),
    "p.tril()[ids]": (
        {"p": (D, D), **MLP},
        lambda m, i: mlp(m, m.p.tril()[i]),
        lambda s: ids(s, D),
    ),
    "p.abs()[ids]": (T, lambda m, i: mlp(m, m.p.abs()[i]), ids),
    "p.square()[ids]": (T, lambda m, i: mlp(m, m.p.square()[i]), ids),
    "(p * p)[ids]": (T, lambda m, i: mlp(m, (m.p * m.p)[i]), ids),
    "(p @ q)[ids]": ({"p": (V, D), "q": (D, D), **MLP}, lambda m, i: mlp(m, (m.p @ m.q)[i]), ids),
    "(p @ q.T)[ids]": (
        {"p": (V, D), "q": (D, D), **MLP},
        lambda m, i: mlp(m, (m.p @ m.q.T)[i]),
        ids,
    ),
    "cat([p, q])[ids]": (
        {"p": (V, D), "q": (2, D), **MLP},
        lambda m, i: mlp(m, torch.cat([m.p, m.q])[i]),
        lambda s: ids(s, V + 2),
    ),
    "p.double()[ids]": (T, lambda m, i: mlp(m, m.p.double()[i, :]), ids),
    # -- a parameter times a transposed parameter -------------------------------------------------
    "F.linear(lat, w)": (PROD, lambda m, x: att(m, F.linear(m.lat, m.w), x), floats(D)),
    "F.linear(lat, w, b)": (
        PROD,
        lambda m, x: att(m, F.relu(F.linear(m.lat, m.w, m.b)), x),
        floats(D),
    ),
    "lat @ w.T": (PROD, lambda m, x: att(m, m.lat @ m.w.T, x), floats(D)),
    "relu(lat @ w.T + b)": (PROD, lambda m, x: att(m, F.relu(m.lat @ m.w.T + m.b), x), floats(D)),
    "matmul(lat, w.T)": (PROD, lambda m, x: att(m, torch.matmul(m.lat, m.w.T), x), floats(D)),
    "mm(lat, w.t())": (PROD, lambda m, x: att(m, torch.mm(m.lat, m.w.t()), x), floats(D)),
    "lat @ w.transpose(0, 1)": (
        PROD,
        lambda m, x: att(m, m.lat @ m.w.transpose(0, 1), x),
        floats(D),
    ),
    "lat @ w.mT": (PROD, lambda m, x: att(m, m.lat @ m.w.mT, x), floats(D)),
    "lat @ w.permute(1, 0)": (PROD, lambda m, x: att(m, m.lat @ m.w.permute(1, 0), x), floats(D)),
    "addmm(b, lat, w.T)": (PROD, lambda m, x: att(m, torch.addmm(m.b, m.lat, m.w.T), x), floats(D)),
    "addmm(b, lat, w.T, beta, alpha)": (
        PROD,
        lambda m, x: att(m, torch.addmm(m.b, m.lat, m.w.T, beta=0.5, alpha=2.0), x),
        floats(D),
    ),
    "addmm(B [L, E], lat, w.T)": (
        {**PROD, "bm": (L, E)},
        lambda m, x: att(m, torch.addmm(m.bm, m.lat, m.w.T), x),
        floats(D),
    ),
    "addmm(B [L, 1], lat, w.T)": (
        {**PROD, "bm": (L, 1)},
        lambda m, x: att(m, torch.addmm(m.bm, m.lat, m.w.T), x),
        floats(D),
    ),
    "einsum ld,ed->le": (
        PROD,
        lambda m, x: att(m, torch.einsum("ld,ed->le", m.lat, m.w), x),
        floats(D),
    ),
    "einsum ld,ed->el": (
        PROD,
        lambda m, x: att(m, torch.einsum("ld,ed->el", m.lat, m.w).T, x),
        floats(D),
    ),
    "einsum ld,de->le": (
        {**PROD, "w": (D, E)},
        lambda m, x: att(m, torch.einsum("ld,de->le", m.lat, m.w), x),
        floats(D),
    ),
    "einsum bld,ed->ble": (
        {**PROD, "lat": (2, L, D)},
        lambda m, x: att(m, torch.einsum("bld,ed->ble", m.lat, m.w).sum(0), x),
        floats(D),
    ),
    "einsum ld,ld->l": (
        {**PROD, "w": (L, D)},
        lambda m, x: F.relu(F.linear(x, m.k)) * torch.einsum("ld,ld->l", m.lat, m.w).sum(),
        floats(D),
    ),
    "lat.expand(B) @ w.T": (
        PROD,
        lambda m, x: (
            F.relu(F.linear(x, m.k))[:, None, :] * (m.lat.expand(x.shape[0], -1, -1) @ m.w.T)
        ).sum(-1),
        floats(D),
    ),
    "lat1 @ w.T": ({**PROD, "lat": (D,)}, lambda m, x: att(m, (m.lat @ m.w.T)[None], x), floats(D)),
    "lat @ w.T, x @ w": (
        PROD,
        lambda m, x: (
            att(m, m.lat @ m.w.T, x) + (F.relu(F.linear(x, m.k)) @ m.w).sum(-1, keepdim=True)
        ),
        floats(D),
    ),
    "lat @ w.T, F.linear(x, w)": (
        PROD,
        lambda m, x: att(m, m.lat @ m.w.T, x) + F.relu(F.linear(x, m.w)).sum(-1, keepdim=True),
        floats(D),
    ),
    "lat @ w.T, F.linear(x, lat)": (
        PROD,
        lambda m, x: att(m, m.lat @ m.w.T, x) * F.relu(F.linear(x, m.lat)).sum(-1, keepdim=True),
        floats(D),
    ),
    "lat[:2] @ w.T": (PROD, lambda m, x: att(m, m.lat[:2] @ m.w.T, x), floats(D)),
    "lat[[0, 0, 2]] @ w.T": (PROD, lambda m, x: att(m, m.lat[[0, 0, 2]] @ m.w.T, x), floats(D)),
    "lat.T @ w.T": ({**PROD, "lat": (D, L)}, lambda m, x: att(m, m.lat.T @ m.w.T, x), floats(D)),
    "lat1.view(L, D) @ w.T": (
        {**PROD, "lat": (L * D,)},
        lambda m, x: att(m, m.lat.view(L, D) @ m.w.T, x),
        floats(D),
    ),
    "lat1.view(D, L).T @ w.T": (
        {**PROD, "lat": (L * D,)},
        lambda m, x: att(m, m.lat.view(D, L).T @ m.w.T, x),
        floats(D),
    ),
    "lat.flip(1) @ w.T": (PROD, lambda m, x: att(m, m.lat.flip(1) @ m.w.T, x), floats(D)),
    "w @ w.T": (PROD, lambda m, x: att(m, (m.w @ m.w.T)[:L], x), floats(D)),
    "w.T @ w.T square": (
        {**PROD, "w": (D, D), "k": (D, D)},
        lambda m, x: att(m, m.w.T @ m.w.T, x),
        floats(D),
    ),
    "einsum ld,ed->le same": (
        PROD,
        lambda m, x: att(m, torch.einsum("ld,ed->le", m.w, m.w)[:L], x),
        floats(D),
    ),
    "layer_norm(lat @ w.T)": (
        PROD,
        lambda m, x: att(m, F.layer_norm(m.lat @ m.w.T, (E,)), x),
        floats(D),
    ),
    "softmax(lat @ w.T)": (
        PROD,
        lambda m, x: att(m, torch.softmax(m.lat @ m.w.T, -1), x),
        floats(D),
    ),
    "lat @ w.T + lat": (
        {**PROD, "w": (D, D), "k": (D, D), "b": (D,)},
        lambda m, x: att(m, m.lat @ m.w.T + m.lat, x),
        floats(D),
    ),
    "lat @ w3.mT": (
        {**PROD, "w": (2, E, D)},
        lambda m, x: att(m, (m.lat @ m.w.mT).sum(0), x),
        floats(D),
    ),
    "lat @ w3.transpose(1, 2)": (
        {**PROD, "w": (2, E, D)},
        lambda m, x: att(m, (m.lat @ m.w.transpose(1, 2))[1], x),
        floats(D),
    ),
    "relu(lat @ w.T) @ w2.T": (
        {**PROD, "w2": (E, E)},
        lambda m, x: att(m, F.relu(m.lat @ m.w.T) @ m.w2.T, x),
        floats(D),
    ),
    "lat @ w.T @ v": (
        {**PROD, "v": (E, E)},
        lambda m, x: att(m, m.lat @ m.w.T @ m.v, x),
        floats(D),
    ),
    "w.T[ids] lookup and lat @ w.T": (
        {**PROD, "w": (V, D), "k": (V, D)},
        lambda m, x: (
            att(m, m.lat @ m.w.T, x) + m.w.T[(x @ m.w.T).argmax(-1) % D].sum(-1, keepdim=True)
        ),
        floats(D),
    ),
    "w.flip(1) @ w.T": (PROD, lambda m, x: att(m, (m.w.flip(1) @ m.w.T)[:L], x), floats(D)),
    "w[:L] @ w.T": (PROD, lambda m, x: att(m, m.w[:L] @ m.w.T, x), floats(D)),
    "w[[0, 1, 2]] @ w.T": (PROD, lambda m, x: att(m, m.w[[0, 1, 2]] @ m.w.T, x), floats(D)),
    "(w * 2) @ w.T": (PROD, lambda m, x: att(m, ((m.w * 2) @ m.w.T)[:L], x), floats(D)),
    "addmm(w[:, 0], lat, w.T)": (
        {**PROD, "w": (E, E), "lat": (L, E)},
        lambda m, x: att(m, torch.addmm(m.w[:, 0], m.lat, m.w.T), x),
        floats(D),
    ),
    "addmm(lat, lat, w.T) square": (
        {**PROD, "lat": (E, D), "w": (E, D)},
        lambda m, x: att(m, torch.addmm(m.lat[:, :E], m.lat, m.w.T), x),
        floats(D),
    ),
    "lat3[ids] @ w.T": (
        {**PROD, "lat": (V, L, D)},
        lambda m, x: att(m, (m.lat[(x @ m.k.T).argmax(-1) % V] @ m.w.T).sum(0), x),
        floats(D),
    ),
    "lat3[0] @ w.T": (
        {**PROD, "lat": (2, L, D)},
        lambda m, x: att(m, m.lat[0] @ m.w.T, x),
        floats(D),
    ),
    "lat3 @ w.T": (
        {**PROD, "lat": (2, L, D)},
        lambda m, x: att(m, (m.lat @ m.w.T)[1], x),
        floats(D),
    ),
    "lat3 @ w.T and F.linear(lat3[0])": (
        {**PROD, "lat": (2, L, D), "v": (E, D)},
        lambda m, x: att(m, (m.lat @ m.w.T)[1] * F.linear(m.lat[0], m.v), x),
        floats(D),
    ),
    "weight_norm(lat) @ w.T": (
        {**PROD, "g": (L, 1)},
        lambda m, x: att(m, torch._weight_norm(m.lat, m.g, 0) @ m.w.T, x),
        floats(D),
    ),
    "lat @ weight_norm(w).T": (
        {**PROD, "g": (E, 1)},
        lambda m, x: att(m, m.lat @ torch._weight_norm(m.w, m.g, 0).T, x),
        floats(D),
    ),
    "lat @ weight_norm(w [E, 1]).T": (
        {**PROD, "w": (E, 1), "g": (E, 1), "lat": (L, 1)},
        lambda m, x: att(m, m.lat @ torch._weight_norm(m.w, m.g, 0).T, x),
        floats(D),
    ),
    "lat @ (w * 2).T": (PROD, lambda m, x: att(m, m.lat @ (m.w * 2).T, x), floats(D)),
    "lat @ w.T.contiguous()": (PROD, lambda m, x: att(m, m.lat @ m.w.T.contiguous(), x), floats(D)),
    "lat @ w.T.flip(0)": (PROD, lambda m, x: att(m, m.lat @ m.w.T.flip(0), x), floats(D)),
    "lat @ w.T.flip(1)": (PROD, lambda m, x: att(m, m.lat @ m.w.T.flip(1), x), floats(D)),
    "lat @ w.view(D, E)": (PROD, lambda m, x: att(m, m.lat @ m.w.view(D, E), x), floats(D)),
    "lat @ w.reshape(E, D).T": (
        PROD,
        lambda m, x: att(m, m.lat @ m.w.reshape(E, D).T, x),
        floats(D),
    ),
    "lat @ w1.view(E, D).T": (
        {**PROD, "w": (E * D,)},
        lambda m, x: att(m, m.lat @ m.w.view(E, D).T, x),
        floats(D),
    ),
    "lat @ w1.view(D, E)": (
        {**PROD, "w": (E * D,)},
        lambda m, x: att(m, m.lat @ m.w.view(D, E), x),
        floats(D),
    ),
    "lat @ w.T square": (
        {**PROD, "w": (D, D), "k": (D, D)},
        lambda m, x: att(m, m.lat @ m.w.T, x) + att(m, m.lat @ m.w, x),
        floats(D),
    ),
    "w.T @ lat.T": (PROD, lambda m, x: att(m, (m.w @ m.lat.T).T, x), floats(D)),
    "lat.T.T @ w.T": (PROD, lambda m, x: att(m, m.lat.T.T @ m.w.T, x), floats(D)),
    "torch.inner(lat, w)": (PROD, lambda m, x: att(m, torch.inner(m.lat, m.w), x), floats(D)),
    "tensordot(lat, w.T, 1)": (
        PROD,
        lambda m, x: att(m, torch.tensordot(m.lat, m.w.T, 1), x),
        floats(D),
    ),
    "multi_dot(lat, w.T)": (
        PROD,
        lambda m, x: att(m, torch.linalg.multi_dot([m.lat, m.w.T]), x),
        floats(D),
    ),
    "bmm(lat3, w.T[None])": (
        {**PROD, "lat": (1, L, D)},
        lambda m, x: att(m, torch.bmm(m.lat, m.w.T[None])[0], x),
        floats(D),
    ),
    "lat @ w.T.T.T": (PROD, lambda m, x: att(m, m.lat @ m.w.T.T.T, x), floats(D)),
    # -- gathers on a parameter by the data -------------------------------------------------------
    "P.gather(1, idx)": (
        {"P": (4, D), **MLP},
        lambda m, x: mlp(
            m, F.pad(m.P[:1].expand(x.shape[0], -1).gather(1, picks(m, x)), (0, 3)) * x
        ),
        floats(D),
    ),
    "P.gather(1, idx [B, 2])": (
        {"P": (6, D), "fc": (H, 2), "pr": (D, H)},
        lambda m, x: F.linear(
            F.relu(F.linear(m.P[: x.shape[0]].gather(1, picks(m, x)), m.fc)), m.pr
        ),
        floats(D),
    ),
    "P.gather(-1, idx)": (
        {"P": (6, D), "fc": (H, 2), "pr": (D, H)},
        lambda m, x: F.linear(
            F.relu(F.linear(m.P.gather(-1, picks(m, x)[:1].expand(6, -1)), m.fc)), m.pr
        ),
        floats(D),
    ),
    "gather(P, 1, idx smaller)": (
        {"P": (4, D), "fc": (H, 1), "pr": (D, H)},
        lambda m, x: (
            F.linear(
                F.relu(F.linear(torch.gather(m.P, 1, picks(m, x)[:1, :1].expand(2, 1)), m.fc)), m.pr
            ).sum(0)
            * x
        ),
        floats(D),
    ),
    "P.gather(0, idx)": (
        {"P": (D, 3), "g": (H, 3), **MLP},
        lambda m, x: (
            mlp(m, x)
            + F.linear(F.relu(F.linear(m.P.gather(0, picks(m, x)[:, :1].expand(-1, 3)), m.g)), m.pr)
        ),
        floats(D),
    ),
    "P.gather(1, P.argmax(1))": (
        {"P": (4, D), "g": (H, 4), **MLP},
        lambda m, x: (
            mlp(m, x)
            * F.linear(F.relu(F.linear(m.P.gather(1, m.P.argmax(1, keepdim=True)).T, m.g)), m.pr)
        ),
        floats(D),
    ),
    "P.gather(1, (x @ P.T).argmax)": (
        {"P": (4, D), "fc": (H, D), "pr": (D, H)},
        lambda m, x: mlp(m, x) * F.relu(x @ m.P.T).gather(1, (x @ m.P.T).argmax(1, keepdim=True)),
        floats(D),
    ),
    "P[:B].gather(1, (P[:B] * x).argmax)": (
        {"P": (6, D), **MLP},
        lambda m, x: (
            mlp(m, x) * m.P[: x.shape[0]].gather(1, (m.P[: x.shape[0]] * x).argmax(1, keepdim=True))
        ),
        floats(D),
    ),
    "take_along_dim(P, idx, 1)": (
        {"P": (1, D), "fc": (H, 2), "pr": (D, H)},
        lambda m, x: F.linear(
            F.relu(F.linear(torch.take_along_dim(m.P, picks(m, x), 1), m.fc)), m.pr
        ),
        floats(D),
    ),
    "take_along_dim(P [4, D], idx [1, 2], 1)": (
        {"P": (4, D), "fc": (H, 2), "pr": (D, H)},
        lambda m, x: (
            F.linear(
                F.relu(F.linear(torch.take_along_dim(m.P, picks(m, x)[:1], 1), m.fc)), m.pr
            ).sum(0)
            * x
        ),
        floats(D),
    ),
    "take_along_dim(P [D, 1], idx, 0)": (
        {"P": (D, 1), **MLP},
        lambda m, x: mlp(m, x) * torch.take_along_dim(m.P, picks(m, x).T, 0).sum(),
        floats(D),
    ),
    "take_along_dim(P, idx, -1) 3-D": (
        {"P": (2, 1, D), "fc": (H, 2), "pr": (D, H)},
        lambda m, x: F.linear(
            F.relu(F.linear(torch.take_along_dim(m.P, picks(m, x)[None], -1), m.fc)), m.pr
        ).sum(0),
        floats(D),
    ),
    "take_along_dim(P, idx) flat": (
        {"P": (2, D), **MLP},
        lambda m, x: mlp(m, x) * torch.take_along_dim(m.P, picks(m, x).flatten()).sum(),
        floats(D),
    ),
    "P.index_select(1, idx)": (
        {"P": (H, D), "pr": (D, H)},
        lambda m, x: F.linear(
            F.relu(x.sum(-1, keepdim=True) * m.P.index_select(1, picks(m, x)[0]).sum(-1)), m.pr
        ),
        floats(D),
    ),
    "P.index_select(-1, idx)": (
        {"P": (H, D), "pr": (D, H)},
        lambda m, x: F.linear(F.relu(x[:, :1] * m.P.index_select(-1, picks(m, x)[0])[:, 0]), m.pr),
        floats(D),
    ),
    "P.index_select(1, idx) as a table": (
        {"P": (D, V), **MLP},
        lambda m, i: mlp(m, m.P.index_select(1, i.flatten()).T),
        ids,
    ),
    "P.index_select(0, idx) 3-D": (
        {"P": (V, 2, D), **MLP},
        lambda m, i: mlp(m, m.P.index_select(0, i.flatten()).sum(1)),
        ids,
    ),
    "P.T.gather(0, idx)": (
        {"P": (H, D), "pr": (D, H)},
        lambda m, x: (
            F.linear(F.relu(m.P.T.gather(0, picks(m, x)[:1].T.expand(-1, H))).sum(0), m.pr) * x
        ),
        floats(D),
    ),
    "P.view(-1).gather(0, idx)": (
        {"P": (2, D), **MLP},
        lambda m, x: mlp(m, x) * m.P.view(-1).gather(0, picks(m, x).flatten() * 2).sum(),
        floats(D),
    ),
    # -- topk and sort ----------------------------------------------------------------------------
    "relu(fc(x)).topk(3)": (
        MLP,
        lambda m, x: F.relu(F.linear(x, m.fc)).topk(3).values @ m.pr[:, :3].T,
        floats(D),
    ),
    "topk(largest=False, sorted=False)": (
        MLP,
        lambda m, x: (
            F.relu(F.linear(x, m.fc)).topk(3, -1, False, False).values.sort().values @ m.pr[:, :3].T
        ),
        floats(D),
    ),
    "topk(k from a size)": (
        MLP,
        lambda m, x: (
            F.relu(F.linear(x, m.fc)).topk(min(x.shape[0], H)).values.sum(-1, keepdim=True) * x
        ),
        floats(D),
    ),
    "topk along the batch": (
        MLP,
        lambda m, x: mlp(m, x).topk(1, dim=0).values + mlp(m, x),
        floats(D),
    ),
    "(a * b).topk": (
        {"fc": (H, D), "g": (H, D), "pr": (D, H)},
        lambda m, x: (
            (F.relu(F.linear(x, m.fc)) * F.relu(F.linear(x, m.g))).topk(2).values @ m.pr[:, :2].T
        ),
        floats(D),
    ),
    "(a + b).sort": (
        {"fc": (H, D), "g": (H, D), "pr": (D, H)},
        lambda m, x: F.linear(
            (F.relu(F.linear(x, m.fc)) + F.linear(x, m.g)).sort(descending=True).values, m.pr
        ),
        floats(D),
    ),
    "sort(stable=True)": (
        MLP,
        lambda m, x: F.linear(
            torch.sort(F.relu(F.linear(x, m.fc)), stable=True, dim=-1).values, m.pr
        ),
        floats(D),
    ),
    "sort(x, 1, True)": (
        MLP,
        lambda m, x: F.linear(torch.sort(F.relu(F.linear(x, m.fc)), 1, True)[0], m.pr),
        floats(D),
    ),
    "sort of channels then mlp": (MLP, lambda m, x: mlp(m, x.sort(-1).values), floats(D)),
    "sort(x).indices gathers h": (
        MLP,
        lambda m, x: F.relu(F.linear(x, m.fc)).gather(1, x.sort(-1).indices) @ m.pr[:, :D].T,
        floats(D),
    ),
    "sort(h).indices gathers h": (
        MLP,
        lambda m, x: F.linear(
            F.relu(F.linear(x, m.fc)).gather(1, F.linear(x, m.fc).sort(-1).indices), m.pr
        ),
        floats(D),
    ),
    "topk indices gather x": (
        MLP,
        lambda m, x: (
            x.gather(1, F.relu(F.linear(x, m.fc)).topk(2).indices % D).sum(-1, keepdim=True)
            * mlp(m, x)
        ),
        floats(D),
    ),
    "sort ties": (
        MLP,
        lambda m, x: (
            F.linear(F.relu(F.linear(x.round(), m.fc.round())).sort(-1).values, m.pr) + mlp(m, x)
        ),
        floats(D),
    ),
    "kthvalue": (
        MLP,
        lambda m, x: F.relu(F.linear(x, m.fc)).kthvalue(2).values[:, None] * mlp(m, x),
        floats(D),
    ),
    "msort": (MLP, lambda m, x: F.linear(torch.msort(F.relu(F.linear(x, m.fc))), m.pr), floats(D)),
    "topk of a seq": (
        {**MLP, "g": (H, H)},
        lambda m, x: F.linear(F.relu(F.linear(x, m.fc)).topk(2, dim=1).values, m.pr),
        seqs(D),
    ),
    "topk of a seq, dim=-2": (
        MLP,
        lambda m, x: F.linear(F.relu(F.linear(x, m.fc)).topk(1, -2).values, m.pr),
        seqs(D),
    ),
    "topk + fixed constant": (
        MLP,
        lambda m, x: (F.relu(F.linear(x, m.fc)) + 1.0).topk(2).values.sum(-1, keepdim=True) * x,
        floats(D),
    ),
    "topk of a parameter": (
        {**MLP, "P": (4, H)},
        lambda m, x: mlp(m, x) * m.P.topk(2).values.sum(),
        floats(D),
    ),
    "(P * x).topk": (
        {**MLP, "P": (D,)},
        lambda m, x: mlp(m, x) * (m.P * x).topk(2).values.sum(-1, keepdim=True),
        floats(D),
    ),
    "topk values scaled then mlp": (
        {"P": (D,), **MLP},
        lambda m, x: mlp(m, (x * m.P).sort(-1).values),
        floats(D),
    ),
    "P.gather(1, idx) and F.linear(x, P)": (
        {"P": (H, D), "pr": (D, H)},
        lambda m, x: (
            F.linear(F.relu(F.linear(x, m.P)), m.pr)
            * m.P.gather(1, picks(m, x)[:1].expand(H, -1)).sum()
        ),
        floats(D),
    ),
    "P.index_select(1, idx) and P[ids]": (
        {"P": (V, D), **MLP},
        lambda m, x: mlp(m, m.P[x.argmax(-1) % V]) * m.P.index_select(1, x.argmax(-1)).sum(0)[:1],
        floats(D),
    ),
    "lat.gather(1, idx) and lat @ w.T": (
        PROD,
        lambda m, x: (
            att(m, m.lat @ m.w.T, x) * m.lat.gather(1, picks(m, x)[:1].expand(L, -1)).sum()
        ),
        floats(D),
    ),
    "p[ids].sort(-1)": (T, lambda m, i: mlp(m, m.p[i, :].sort(-1).values), ids),
    "p[ids].topk(2) read by o": (
        {**T, "o": (D, 2)},
        lambda m, i: F.linear(m.p[i, :].topk(2).values, m.o),
        ids,
    ),
    "p[ids].gather(-1, p[ids].sort().indices)": (
        T,
        lambda m, i: mlp(m, m.p[i].gather(-1, m.p[i].sort(-1).indices)),
        ids,
    ),
    "topk(3) read by o": (
        {**MLP, "o": (D, 3)},
        lambda m, x: F.linear(F.relu(F.linear(x, m.fc)).topk(3).values, m.o),
        floats(D),
    ),
    "topk(3, largest=False, sorted=False) read by o": (
        {**MLP, "o": (D, 3)},
        lambda m, x: F.linear(
            F.relu(F.linear(x, m.fc)).topk(3, largest=False, sorted=False).values.sort().values, m.o
        ),
        floats(D),
    ),
    "(a * b).topk read by o": (
        {"fc": (H, D), "g": (H, D), "o": (D, 2)},
        lambda m, x: F.linear(
            (F.relu(F.linear(x, m.fc)) * F.relu(F.linear(x, m.g))).topk(2).values, m.o
        ),
        floats(D),
    ),
    "(h + x).topk": (
        {"fc": (D, D), "o": (D, 2)},
        lambda m, x: F.linear((F.relu(F.linear(x, m.fc)) + x).topk(2).values, m.o),
        floats(D),
    ),
    "g.gather(1, h.sort().indices)": (
        {**MLP, "g": (H, D)},
        lambda m, x: F.linear(
            F.relu(F.linear(x, m.g)).gather(1, F.relu(F.linear(x, m.fc)).sort(-1).indices), m.pr
        ),
        floats(D),
    ),
    "h.topk(2, 0) along the batch": (
        MLP,
        lambda m, x: F.linear(F.relu(F.linear(x, m.fc)).topk(1, 0).values, m.pr) + mlp(m, x),
        floats(D),
    ),
    "topk(k=H) of h": (
        MLP,
        lambda m, x: F.linear(F.relu(F.linear(x, m.fc)).topk(H, dim=1, sorted=True).values, m.pr),
        floats(D),
    ),
    "topk of a parameter's product": (
        {**MLP, "P": (H, D), "o": (D, 2)},
        lambda m, x: F.linear((x @ m.P.T).topk(2).values, m.o) + mlp(m, x),
        floats(D),
    ),
}


def change(name: str) -> tuple[float, int]:
    """The largest relative change of case ``name``'s outputs on fresh inputs under a random
    gauge of the structure discovered on one example, and its number of generators."""
    shapes, fn, make = CASES[name]
    model = Model(shapes, fn)
    s = gaugefix.discover(model, *make(0))
    moved = copy.deepcopy(model)
    gaugefix.random_gauge_(moved, s, SCALE, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        for seed in SEEDS + (4, 5, 6, 7):
            inputs = make(seed)
            before, after = model(*inputs), moved(*inputs)
            worst = max(worst, float((after - before).abs().max() / before.abs().max()))
    return worst, s.num_generators


@pytest.mark.parametrize("name", list(CASES))
def test_gauge_keeps_the_function(name: str) -> None:
    worst, _ = change(name)
    assert worst < TOL


# (a spelling, its reference): the same number of generators
SAME_COUNT = [
    ("p[ids, :]", "F.embedding(ids, p)"),
    ("p[ids, ...]", "F.embedding(ids, p)"),
    ("p[(ids,)]", "F.embedding(ids, p)"),
    ("p.view(V, D)[ids]", "F.embedding(ids, p)"),
    ("p.index_select(0, ids)", "F.embedding(ids, p)"),
    ("lat @ w.T", "F.linear(lat, w)"),
    ("matmul(lat, w.T)", "F.linear(lat, w)"),
    ("einsum ld,ed->le", "F.linear(lat, w)"),
    ("relu(lat @ w.T + b)", "F.linear(lat, w, b)"),
    ("addmm(b, lat, w.T)", "F.linear(lat, w)"),
]


@pytest.mark.parametrize(("spelling", "reference"), SAME_COUNT)
def test_spelling_finds_what_its_reference_finds(spelling: str, reference: str) -> None:
    assert change(spelling)[1] == change(reference)[1] > 0


# -- a list of plain integers may hold a size ------------------------------------------------------
def gated(m: Model, x: Tensor, rows: Any) -> Tensor:
    """``pr(relu(fc(x) * q[rows]))`` for ``x [B, T, D]``: a gate per position, from ``q``'s rows."""
    return F.linear(F.relu(F.linear(x, m.fc) * m.q[rows]), m.pr)


def sequences(length: int) -> Callable[[int], tuple[Tensor]]:
    """Inputs ``[2, T, D]``: ``T = length`` for the example (seed 0), 2 to 6 for the others."""

    def make(seed: int) -> tuple[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        size = length if seed == 0 else 2 + seed % 5
        return (torch.randn(2, size, D, generator=gen, dtype=DTYPE),)

    return make


GATES = {"q": (V, H), **MLP}
QO = {"q": (V, D), "o": (V, D), **MLP}

# Python's range(T) and int(T) give plain ints: such a list names other rows for another length
SIZED_LISTS: dict[str, tuple[dict, Callable[..., Any], Callable[[int], tuple]]] = {
    "q[list(range(T))]": (GATES, lambda m, x: gated(m, x, list(range(x.shape[1]))), sequences(2)),
    "q[[0, 1, 2, 3, 4, 5][:T]]": (
        GATES,
        lambda m, x: gated(m, x, [0, 1, 2, 3, 4, 5][: x.shape[1]]),
        sequences(2),
    ),
    "q[[int(T) - 1]]": (GATES, lambda m, x: gated(m, x, [int(x.shape[1]) - 1]), sequences(2)),
    "q[list(range(T))], T = V": (
        GATES,
        lambda m, x: gated(m, x, list(range(x.shape[1]))),
        sequences(V),
    ),
    "q[reversed range] * o[range], T = V": (
        QO,
        lambda m, x: mlp(
            m, (x * m.q[list(range(x.shape[1]))[::-1]] * m.o[list(range(x.shape[1]))]).sum(1)
        ),
        sequences(V),
    ),
    "W[reversed range] units read by O[range], B = V": (
        {"W": (V, D), "b": (V,), "O": (V, 2)},
        lambda m, x: (
            F.relu(
                F.linear(x, m.W[list(range(x.shape[0]))[::-1]], m.b[list(range(x.shape[0]))[::-1]])
            )[..., None]
            * m.O[list(range(x.shape[0]))]
        ).sum(1),
        lambda seed: (sequences(V)(seed)[0][0],),
    ),
    "q[arange(T)] (reference)": (
        GATES,
        lambda m, x: gated(m, x, torch.arange(x.shape[1])),
        sequences(2),
    ),
}
CASES.update(SIZED_LISTS)


@pytest.mark.parametrize("name", list(SIZED_LISTS))
def test_a_list_of_ints_may_have_been_made_from_a_size(name: str) -> None:
    """Read as ``q[arange(T)]`` is, rows picked by the data: the table's columns are the
    channels, whichever rows the list names (before: rows at constant places, the rows the
    example leaves unread free, 17.5 to 3.8e3 relative change on other lengths)."""
    worst, count = change(name)
    assert worst < TOL
    if "range(T))]" in name:
        assert count == change("q[arange(T)] (reference)")[1]


# -- a plain number made from a size by int(), a tensor of plain numbers ---------------------------
def gate_rows(m: Model, x: Tensor, rows: Tensor) -> Tensor:
    """``pr(relu(fc(x) * rows))``: the rows of ``q`` cut by a forward gate the positions."""
    return F.linear(F.relu(F.linear(x, m.fc) * rows), m.pr)


def channels_picked(m: Model, x: Tensor, channels: Any) -> Tensor:
    """``pr(h) + h[..., channels].sum(-1)`` for ``h = relu(fc(x))``: the picked channels summed."""
    h = F.relu(F.linear(x, m.fc))
    return F.linear(h, m.pr) + h[..., channels].sum(-1, keepdim=True)


# int() of a marked size and len() of a tensor return plain ints: every number after them may
# follow the length
PLAIN_SIZES: dict[str, tuple[dict, Callable[..., Any], Callable[[int], tuple]]] = {
    "q[int(T) - 1]": (GATES, lambda m, x: gated(m, x, int(x.shape[1]) - 1), sequences(2)),
    "q[int(T / 2)]": (GATES, lambda m, x: gated(m, x, int(x.shape[1] / 2)), sequences(2)),
    "q[: int(T)]": (GATES, lambda m, x: gated(m, x, slice(None, int(x.shape[1]))), sequences(2)),
    "q.narrow(0, int(T) - 1, 1)": (
        GATES,
        lambda m, x: gate_rows(m, x, m.q.narrow(0, int(x.shape[1]) - 1, 1)),
        sequences(2),
    ),
    "q[len(x) - 1], x [T, D]": (
        GATES,
        lambda m, x: gated(m, x, len(x) - 1),
        lambda seed: (sequences(2)(seed)[0][0],),
    ),
    "q[torch.tensor(list(range(T)))]": (
        GATES,
        lambda m, x: gated(m, x, torch.tensor(list(range(x.shape[1])))),
        sequences(2),
    ),
    "q[torch.as_tensor(list(range(T)))]": (
        GATES,
        lambda m, x: gated(m, x, torch.as_tensor(list(range(x.shape[1])))),
        sequences(2),
    ),
    "q[torch.tensor([[i] for i in range(T)][::-1])[:, 0]]": (
        GATES,
        lambda m, x: gated(m, x, torch.tensor([[i] for i in range(x.shape[1])][::-1])[:, 0]),
        sequences(2),
    ),
    "q[zeros(()).new_tensor(list(range(T)))]": (
        GATES,
        lambda m, x: gated(m, x, torch.zeros(()).new_tensor(list(range(x.shape[1]))).long()),
        sequences(2),
    ),
    "h[..., torch.tensor(list(range(T)))]": (
        MLP,
        lambda m, x: channels_picked(m, x, torch.tensor(list(range(x.shape[1])))),
        sequences(2),
    ),
    "q[1] after int(T)": (
        GATES,
        lambda m, x: gated(m, x, 1) + 0 * int(x.shape[1]),
        sequences(2),
    ),
    "q[1]": (GATES, lambda m, x: gated(m, x, 1), sequences(2)),
    "q[torch.tensor([[2], [0]])]": (
        GATES,
        lambda m, x: gated(m, x, torch.tensor([[2], [0]])),
        sequences(2),
    ),
}
CASES.update(PLAIN_SIZES)


@pytest.mark.parametrize("name", list(PLAIN_SIZES))
def test_a_plain_number_may_have_been_made_from_a_size(name: str) -> None:
    """``int(T)`` and ``len(x)`` return plain ints, ``torch.tensor(list(range(T)))`` a tensor
    of plain ints: the rows they pick count as picked by the data, as those of ``q[arange(T)]``
    do (read as rows at constant places, the other rows left free: 17.5 to 23.3 relative change
    on other lengths); constant rows stay exact."""
    worst, count = change(name)
    assert worst < TOL
    if name.startswith("q[") and "range(T)" in name:
        assert count == change("q[arange(T)] (reference)")[1]


# -- channels of an activation picked by an index made from a size ---------------------------------
def channels_taken(m: Model, x: Tensor, take: Callable[[Tensor, int], Tensor]) -> Tensor:
    """``pr(h) + take(h, T).sum(-1)`` for ``h = relu(fc(x))`` and ``T = x.shape[1]``."""
    h = F.relu(F.linear(x, m.fc))
    return F.linear(h, m.pr) + take(h, x.shape[1]).sum(-1, keepdim=True)


def spread(index: Tensor, h: Tensor) -> Tensor:
    """The 1-D ``index`` broadcast over the leading dims of ``h``."""
    return index.expand(*h.shape[:-1], len(index))


# the last dim of h carries the hidden channels: for another length T more of them are picked
CHANNELS_BY_LENGTH = {
    "h[..., arange(T)]": lambda m, x: channels_picked(m, x, torch.arange(x.shape[1])),
    "h[..., list(range(T))]": lambda m, x: channels_picked(m, x, list(range(x.shape[1]))),
    "h[..., :T]": lambda m, x: channels_picked(m, x, slice(None, x.shape[1])),
    "h[..., :int(T)]": lambda m, x: channels_picked(m, x, slice(None, int(x.shape[1]))),
    "h[..., [True] * T + [False] * (H - T)]": lambda m, x: channels_picked(
        m, x, [True] * x.shape[1] + [False] * (H - x.shape[1])
    ),
    "h[..., arange(T) % 3]": lambda m, x: channels_picked(m, x, torch.arange(x.shape[1]) % 3),
    "h.narrow(-1, 0, T)": lambda m, x: channels_taken(m, x, lambda h, t: h.narrow(-1, 0, t)),
    "index_select(h, -1, arange(T))": lambda m, x: channels_taken(
        m, x, lambda h, t: torch.index_select(h, -1, torch.arange(t))
    ),
    "h.gather(-1, arange(T).expand(...))": lambda m, x: channels_taken(
        m, x, lambda h, t: h.gather(-1, spread(torch.arange(t), h))
    ),
    "take_along_dim(h, arange(T).expand(...), -1)": lambda m, x: channels_taken(
        m, x, lambda h, t: torch.take_along_dim(h, spread(torch.arange(t), h), -1)
    ),
}
CASES.update({name: (MLP, fn, sequences(2)) for name, fn in CHANNELS_BY_LENGTH.items()})


@pytest.mark.parametrize("name", [*CHANNELS_BY_LENGTH, "h[..., torch.tensor(list(range(T)))]"])
def test_channels_picked_by_a_length_count_as_picked_by_the_data(name: str) -> None:
    """An index made from the length ``T`` (``arange(T)``, ``list(range(T))``, ``:T``) picks
    more channels of ``h`` for a longer input: the channels along that dim share one factor, as
    for an index that depends on the data (read as channels at constant places before: 8.1
    relative change on other lengths)."""
    assert change(name)[0] < TOL


def tokens_picked(m: Model, x: Tensor, take: Callable[[Tensor, int], Tensor]) -> Tensor:
    """``pr(take(relu(fc(x)), T))``: positions of the activation picked along its token dim."""
    return F.linear(take(F.relu(F.linear(x, m.fc)), x.shape[1]), m.pr)


def causal(m: Model, x: Tensor) -> Tensor:
    """``pr(relu(fc(mask[:T, :T] @ x)))``: a causal average of the tokens, cut from a fixed mask."""
    mask = torch.ones(6, 6, dtype=DTYPE).tril()
    return mlp(m, mask[: x.shape[1], : x.shape[1]] @ x)


FIXED = torch.tensor([0, 0, 5, 2])  # channels picked by an index made before the trace

# along the token dims (no channel labels there): what an index made from the length picks, and
# a fixed index repeated along them
TOKENS_BY_LENGTH = {
    "mlp(x)": (MLP, mlp, sequences(2)),
    "mlp(x[:, arange(T)])": (
        MLP,
        lambda m, x: mlp(m, x[:, torch.arange(x.shape[1])]),
        sequences(2),
    ),
    "pr(h[:, arange(T)])": (
        MLP,
        lambda m, x: tokens_picked(m, x, lambda h, t: h[:, torch.arange(t)]),
        sequences(2),
    ),
    "pr(h[:, list(range(T))])": (
        MLP,
        lambda m, x: tokens_picked(m, x, lambda h, t: h[:, list(range(t))]),
        sequences(2),
    ),
    "pr(index_select(h, 1, arange(T)))": (
        MLP,
        lambda m, x: tokens_picked(m, x, lambda h, t: h.index_select(1, torch.arange(t))),
        sequences(2),
    ),
    "mlp(mask[:T, :T] @ x)": (MLP, causal, sequences(2)),
    "mlp(x + p[arange(T)])": (
        T,
        lambda m, x: mlp(m, x + m.p[torch.arange(x.shape[1])]),
        sequences(2),
    ),
    "mlp(x + F.embedding(arange(T), p))": (
        T,
        lambda m, x: mlp(m, x + F.embedding(torch.arange(x.shape[1]), m.p)),
        sequences(2),
    ),
    "h[..., FIXED]": (MLP, lambda m, x: channels_picked(m, x, FIXED), sequences(2)),
    "h.gather(-1, FIXED.expand(B, T, 4))": (
        MLP,
        lambda m, x: channels_taken(
            m, x, lambda h, t: h.gather(-1, FIXED.expand(*h.shape[:-1], 4))
        ),
        sequences(2),
    ),
}
CASES.update(TOKENS_BY_LENGTH)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("mlp(x[:, arange(T)])", "mlp(x)"),
        ("pr(h[:, arange(T)])", "mlp(x)"),
        ("pr(h[:, list(range(T))])", "mlp(x)"),
        ("pr(index_select(h, 1, arange(T)))", "mlp(x)"),
        ("mlp(mask[:T, :T] @ x)", "mlp(x)"),
        ("mlp(x + p[arange(T)])", "mlp(x + F.embedding(arange(T), p))"),
        ("h.gather(-1, FIXED.expand(B, T, 4))", "h[..., FIXED]"),
    ],
)
def test_tokens_picked_by_a_length_keep_the_channels(name: str, reference: str) -> None:
    """Along a token dim the labels are one already: an index made from the length there costs
    no generator, nor does a fixed index of channels repeated along the batch and the sequence
    (it picks the same channels for every size), and the gauge stays exact."""
    worst, count = change(name)
    assert worst < TOL
    assert count == change(reference)[1] > 0
