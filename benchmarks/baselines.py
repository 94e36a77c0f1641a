"""The two balancing baselines, implemented from their papers on the same float64 masses (and
the same matrix-vector products) as :func:`gaugefix.balance_`, so that the comparison is between
algorithms, not implementations.

- Gauss-Seidel sweeps of closed-form updates (the generalisation of Equi-normalization, Stock,
  Graham, Gribonval and Jegou, ICLR 2019, from layers to any generators): cyclic sweeps over
  blocks of mutually non-coupled generators (no parameter entry carries two of them), here the
  generators first produced by one module (``structure.generator_layers``), split by greedy
  colouring where they couple. Updating one block is exact block coordinate descent on
  ``F(h) = ||g(h) theta||^2``: each of its generators moves to its own balance
  ``h_n += log(S_out,n / S_in,n) / 4``.
- Parallel multiplicative updates (Saul, "Weight-balancing fixes and flows for deep learning",
  TMLR 2023): every generator at once, ``a_n = (S_out,n / S_in,n)^(1/4)``.

Both stop when ``max_n |mu_n| / S_n <= tol`` over the live generators, then apply the gauge to
the model like ``balance_`` does.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gaugefix import GaugeStructure, apply_gauge_
from gaugefix.balancing import masses_of
from gaugefix.masses import Masses


@dataclass
class BaselineResult:
    iterations: int  # sweeps (ENorm) or parallel updates (Saul)
    mu_rel_max: float
    converged: bool


def _max_rel(s_in: Tensor, s_out: Tensor, active: Tensor) -> float:
    if not bool(active.any()):
        return 0.0
    mu, s = s_in - s_out, s_in + s_out
    return float((mu.abs()[active] / s[active]).max())


def _local(s_in: Tensor, s_out: Tensor, active: Tensor) -> Tensor:
    """``log(S_out / S_in) / 4`` on live generators, 0 elsewhere."""
    return torch.where(active, 0.25 * torch.log(s_out / s_in), 0.0)


def _sums(masses: Masses, h: Tensor) -> tuple[Tensor, Tensor]:
    state = masses.at(h[None])
    return state.s_in[0], state.s_out[0]


@torch.no_grad()
def saul_balance_(
    model: nn.Module, structure: GaugeStructure, tol: float = 1e-10, max_iter: int = 100_000
) -> BaselineResult:
    """Parallel multiplicative updates until ``max |mu| / S <= tol``."""
    masses = masses_of(structure.bind(model), structure)
    h = torch.zeros(structure.num_generators, dtype=torch.float64, device=masses.device)
    s_in, s_out = _sums(masses, h)
    active = (s_in > 0) & (s_out > 0)
    err, it = math.inf, 0
    for it in range(max_iter + 1):  # noqa: B007
        err = _max_rel(s_in, s_out, active)
        if err <= tol or it == max_iter:
            break
        h = h + _local(s_in, s_out, active)
        masses.rebase(h[None])
        s_in, s_out = _sums(masses, h)
    apply_gauge_(model, structure, h)
    return BaselineResult(it, err, err <= tol)


def coupled_pairs(structure: GaugeStructure, same: Tensor) -> list[tuple[int, int]]:
    """The pairs of generators some parameter entry carries together, among those that
    ``same`` (an int label per generator) puts in one group (the only pairs a block split
    needs)."""
    pairs = []
    for param in structure.params.values():
        terms = [t.index for t in param.terms]
        for i, a in enumerate(terms):
            for b in terms[i + 1 :]:
                x, y = torch.broadcast_tensors(a, b)
                x, y = x.reshape(-1), y.reshape(-1)
                keep = (x >= 0) & (y >= 0)
                x, y = x[keep], y[keep]
                keep = same[x] == same[y]
                both = torch.unique(torch.stack([x[keep], y[keep]]), dim=1)
                pairs.extend(zip(both[0].tolist(), both[1].tolist(), strict=True))
    return pairs


def gauss_seidel_blocks(structure: GaugeStructure) -> list[Tensor]:
    """The blocks of mutually non-coupled generators, in the order their modules first
    produce them: ``structure.generator_layers``, each split by greedy colouring where it
    couples."""
    names: dict[str, int] = {}
    layer_of = torch.tensor(
        [names.setdefault(name, len(names)) for name in structure.generator_layers],
        dtype=torch.long,
    )
    neighbours: dict[int, set[int]] = {}
    for a, b in coupled_pairs(structure, layer_of):
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


# Each structure's blocks with the parameters they act on: they depend on the structure alone,
# so, like balance_'s plans (GaugeStructure.plan, gaugefix.kernels.kernel_plan), they are built
# once per structure and not with every call that is timed.
_PLANS: weakref.WeakKeyDictionary[GaugeStructure, list[tuple[Tensor, list[str]]]] = (
    weakref.WeakKeyDictionary()
)


def gauss_seidel_plan(structure: GaugeStructure) -> list[tuple[Tensor, list[str]]]:
    """The blocks of :func:`gauss_seidel_blocks`, each with the names of the parameters its
    generators act on (built once per structure, then cached)."""
    if structure not in _PLANS:
        n, plan = structure.num_generators, []
        for block in gauss_seidel_blocks(structure):
            member = torch.zeros(n + 1, dtype=torch.bool)  # slot n: an entry's missing term
            member[block] = True
            names = [
                p.name
                for p in structure.params.values()
                if any(bool(member[t.index.reshape(-1)].any()) for t in p.terms)
            ]
            plan.append((block, names))
        _PLANS[structure] = plan
    return _PLANS[structure]


@torch.no_grad()
def gauss_seidel_balance_(
    model: nn.Module, structure: GaugeStructure, tol: float = 1e-10, max_sweeps: int = 100_000
) -> BaselineResult:
    """Cyclic block closed-form sweeps until ``max |mu| / S <= tol``. Each block reads only the
    parameters its generators act on (its own masses)."""
    params = structure.bind(model)
    h = torch.zeros(structure.num_generators, dtype=torch.float64)
    blocks = [
        (block, Masses({name: params[name].detach()[None] for name in names}, structure))
        for block, names in gauss_seidel_plan(structure)
    ]
    whole = masses_of(params, structure)
    s_in, s_out = _sums(whole, h)
    active = (s_in > 0) & (s_out > 0)
    err = _max_rel(s_in, s_out, active)
    sweep = 0
    while err > tol and sweep < max_sweeps:
        sweep += 1
        sweep_max = 0.0
        for block, masses in blocks:
            s_in, s_out = _sums(masses, h)
            a, b, live = s_in[block], s_out[block], active[block]
            if bool(live.any()):
                sweep_max = max(sweep_max, _max_rel(a, b, live))
            h[block] += _local(a, b, live)
            masses.rebase(h[None])
        if sweep_max <= tol:
            whole.rebase(h[None])
            s_in, s_out = _sums(whole, h)
            err = _max_rel(s_in, s_out, active)
    apply_gauge_(model, structure, h)
    return BaselineResult(sweep, err, err <= tol)
