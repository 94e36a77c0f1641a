"""The two balancing baselines of item 2, implemented from their papers on the same float64
pair masses (and the same matrix-vector products) as :func:`gaugefix.balance_`, so that the
comparison is between algorithms, not implementations.

- Equi-normalization (Stock, Graham, Gribonval and Jegou, ICLR 2019): cyclic layer-wise
  closed-form sweeps. A "layer" is a set of mutually non-coupled neurons (no parameter entry
  has its row in one and its column in another), here the neurons first produced by one
  module (``structure.neuron_layers``), split by greedy colouring if they couple. Updating one
  layer is exact block coordinate descent on ``F(h) = ||g(h) theta||^2``: every neuron of the
  layer moves to its own balance ``h_n += log(S_out,n / S_in,n) / 4``. Biases (and every other
  incoming entry) count in ``S_in``, so it solves the same problem as ``balance_``.
- Parallel multiplicative updates (Saul, "Weight-balancing fixes and flows for deep learning",
  TMLR 2023): every neuron at once, ``a_n = (S_out,n / S_in,n)^(1/4)``.

Both stop when ``max_n |mu_n| / S_n <= tol`` over the live neurons, then apply the gauge to the
model like ``balance_`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gaugefix import GaugeStructure, apply_gauge_
from gaugefix.moment import MassMatrices


@dataclass
class BaselineResult:
    iterations: int  # sweeps (ENorm) or parallel updates (Saul)
    max_rel_imbalance: float
    converged: bool


def _max_rel(s_in: Tensor, s_out: Tensor, active: Tensor) -> float:
    if not bool(active.any()):
        return 0.0
    mu, s = s_in - s_out, s_in + s_out
    return float((mu.abs()[active] / s[active]).max())


def _local(s_in: Tensor, s_out: Tensor, active: Tensor) -> Tensor:
    """``log(S_out / S_in) / 4`` on live neurons, 0 elsewhere."""
    return torch.where(active, 0.25 * torch.log(s_out / s_in), 0.0)


@torch.no_grad()
def saul_balance_(
    model: nn.Module, structure: GaugeStructure, tol: float = 1e-10, max_iter: int = 100_000
) -> BaselineResult:
    """Parallel multiplicative updates until ``max |mu| / S <= tol``."""
    mm = MassMatrices(structure.bind(model), structure)
    h = torch.zeros(structure.num_neurons, dtype=torch.float64, device=mm.device)
    state = mm.at(h)
    active = (state.s_in > 0) & (state.s_out > 0)
    err, it = math.inf, 0
    for it in range(max_iter + 1):  # noqa: B007
        err = _max_rel(state.s_in, state.s_out, active)
        if err <= tol or it == max_iter:
            break
        h = h + _local(state.s_in, state.s_out, active)
        mm.rebase(h)
        state = mm.at(h)
    apply_gauge_(model, structure, h)
    return BaselineResult(it, err, err <= tol)


class _Layer:
    """One ENorm block: its neurons, and the matrices and flat entries touching them."""

    def __init__(self, mm: MassMatrices, neurons: Tensor) -> None:
        n = mm.n
        self.neurons = neurons
        member = torch.zeros(n + 1, dtype=torch.bool, device=mm.device)
        member[neurons] = True
        self.row_mats = [i for i, (_, rho, _) in enumerate(mm.matrices) if bool(member[rho].any())]
        self.col_mats = [
            i for i, (_, _, gamma) in enumerate(mm.matrices) if bool(member[gamma].any())
        ]
        _, r, c, _ = mm.flat
        self.flat = torch.nonzero(member[r] | member[c]).reshape(-1)


def enorm_layers(mm: MassMatrices, structure: GaugeStructure) -> list[Tensor]:
    """The blocks of mutually non-coupled neurons, in the order their modules first produce
    them: ``structure.neuron_layers``, each split by greedy colouring where it couples."""
    n = structure.num_neurons
    names: dict[str, int] = {}
    layer_of = torch.tensor(
        [names.setdefault(name, len(names)) for name in structure.neuron_layers], dtype=torch.long
    )
    # Couplings between two neurons of one layer (rare: a module consuming its own outputs).
    pairs = []
    for _, rho, gamma in mm.matrices:
        r, c = rho[rho < n], gamma[gamma < n]
        shared = set(layer_of[r].tolist()) & set(layer_of[c].tolist())
        for layer in shared:
            rr, cc = r[layer_of[r] == layer], c[layer_of[c] == layer]
            left, right = rr.repeat_interleave(len(cc)), cc.repeat(len(rr))
            pairs.extend(zip(left.tolist(), right.tolist(), strict=True))
    _, fr, fc, _ = mm.flat
    keep = (fr < n) & (fc < n) & (fr != fc)
    keep[keep.clone()] = layer_of[fr[keep]] == layer_of[fc[keep]]
    pairs.extend(zip(fr[keep].tolist(), fc[keep].tolist(), strict=True))
    neighbours: dict[int, set[int]] = {}
    for a, b in pairs:
        if a != b:
            neighbours.setdefault(a, set()).add(b)
            neighbours.setdefault(b, set()).add(a)
    blocks = []
    for layer in range(len(names)):
        members = torch.nonzero(layer_of == layer).reshape(-1).tolist()
        colour: dict[int, int] = {}
        for a in members:
            used = {colour[b] for b in neighbours.get(a, ()) if b in colour}
            colour[a] = next(k for k in range(len(used) + 1) if k not in used)
        for k in sorted(set(colour.values())):
            blocks.append(torch.tensor([a for a in members if colour[a] == k], dtype=torch.long))
    return blocks


@torch.no_grad()
def enorm_balance_(
    model: nn.Module, structure: GaugeStructure, tol: float = 1e-10, max_sweeps: int = 100_000
) -> BaselineResult:
    """Cyclic layer-wise closed-form sweeps until ``max |mu| / S <= tol``."""
    mm = MassMatrices(structure.bind(model), structure)
    n = structure.num_neurons
    h = torch.zeros(n, dtype=torch.float64, device=mm.device)
    state = mm.at(h)
    active = (state.s_in > 0) & (state.s_out > 0)
    err = _max_rel(state.s_in, state.s_out, active)
    layers = [_Layer(mm, b.to(mm.device)) for b in enorm_layers(mm, structure)]
    w, r, c, moving = mm.flat
    sweep = 0
    while err > tol and sweep < max_sweeps:
        sweep += 1
        sweep_max = 0.0
        for layer in layers:
            up = torch.exp(2 * torch.cat([h - mm.base, h.new_zeros(1)]))
            down = 1 / up
            s_in = torch.zeros(n + 1, dtype=torch.float64, device=mm.device)
            s_out = torch.zeros_like(s_in)
            for i in layer.row_mats:
                mat, rho, gamma = mm.matrices[i]
                s_in.index_add_(0, rho, up[rho] * (mat @ down[gamma]))
            for i in layer.col_mats:
                mat, rho, gamma = mm.matrices[i]
                s_out.index_add_(0, gamma, down[gamma] * (mat.T @ up[rho]))
            f = layer.flat
            u = w[f] * up[r[f]] * down[c[f]] * moving[f]
            s_in.index_add_(0, r[f], u)
            s_out.index_add_(0, c[f], u)
            idx = layer.neurons
            a, b, live = s_in[idx], s_out[idx], active[idx]
            if bool(live.any()):
                sweep_max = max(sweep_max, _max_rel(a, b, live))
            h[idx] += _local(a, b, live)
        mm.rebase(h)
        if sweep_max <= tol:
            state = mm.at(h)
            err = _max_rel(state.s_in, state.s_out, active)
    apply_gauge_(model, structure, h)
    return BaselineResult(sweep, err, err <= tol)
