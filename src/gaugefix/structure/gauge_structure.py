"""``GaugeStructure``: the gauge group of a model, compiled to per-parameter index maps."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor, nn

from gaugefix.structure.trace import TraceContext, _compact

FORMAT = "gaugefix.GaugeStructure/1"


class Exclusion(NamedTuple):
    """Channels of a producing module that are not gauge neurons, and why."""

    module: str
    reason: str
    channels: tuple[int, ...]


@dataclass(frozen=True)
class ParamMap:
    """Which gauge neuron scales each entry of one parameter.

    ``rows[idx]`` is the neuron whose factor ``a_n`` multiplies the entry, ``cols[idx]`` the one
    whose factor divides it, ``-1`` for none. Both are int64 tensors with the parameter's number of
    dims, broadcastable to its shape (dims along which the map is constant have size 1: a Linear
    weight has ``rows`` of shape ``[out, 1]`` and ``cols`` of shape ``[1, in]``). ``None`` means
    no entry has that side.
    """

    name: str
    shape: tuple[int, ...]
    rows: Tensor | None
    cols: Tensor | None


class NeuronSlices(NamedTuple):
    """The parameter entries that scale by ``a_n`` (``produced_by``) and ``1/a_n``
    (``consumed_by``), each as ``(parameter name, index tuple into the parameter's map)``."""

    produced_by: list[tuple[str, tuple[int, ...]]]
    consumed_by: list[tuple[str, tuple[int, ...]]]


class GaugeStructure:
    """The neuron-wise positive rescaling symmetries of one model.

    ``num_neurons`` gauge neurons; ``params`` maps each parameter that some neuron touches to its
    :class:`ParamMap`; ``excluded`` lists, per producing module, the channels that are not gauge
    neurons with the reason; ``neuron_layers[n]`` names the module that first produces neuron n.
    """

    def __init__(
        self,
        num_neurons: int,
        params: dict[str, ParamMap],
        excluded: list[Exclusion],
        neuron_layers: list[str],
        param_order: list[str],
    ) -> None:
        self.num_neurons = num_neurons
        self.params = params
        self.excluded = excluded
        self.neuron_layers = neuron_layers
        self.param_order = param_order
        self._device_maps: dict[torch.device, list[DeviceMap]] = {}

    def __repr__(self) -> str:
        return (
            f"GaugeStructure(num_neurons={self.num_neurons}, params={len(self.params)}, "
            f"excluded={sum(len(e.channels) for e in self.excluded)} channels)"
        )

    # -- inspection ---------------------------------------------------------------------------
    def neuron(self, n: int) -> NeuronSlices:
        """The parameter slices that produce and consume gauge neuron ``n``."""
        if not 0 <= n < self.num_neurons:
            raise IndexError(f"neuron {n} out of range [0, {self.num_neurons})")
        produced, consumed = [], []
        for m in self.params.values():
            for idx, out in ((m.rows, produced), (m.cols, consumed)):
                if idx is not None:
                    out.extend((m.name, tuple(i.tolist())) for i in torch.nonzero(idx == n))
        return NeuronSlices(produced, consumed)

    @cached_property
    def layer_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.neuron_layers:
            counts[layer] = counts.get(layer, 0) + 1
        return counts

    def summary(self) -> str:
        """A table per producing layer: its channels that belong to gauge neurons (a neuron
        shared through a residual connection counts in every layer producing it), the neurons
        it is the first producer of, and notes: the channels whose neurons another layer
        produces first, and the channels excluded, with the reason."""
        gauged: dict[str, int] = {}
        produced: dict[str, set[int]] = {}
        for m in self.params.values():
            if m.rows is not None:
                module = _module_of(m.name)
                gauged[module] = max(gauged.get(module, 0), int((m.rows >= 0).sum()))
                produced.setdefault(module, set()).update(m.rows[m.rows >= 0].unique().tolist())
        notes: dict[str, list[str]] = {name: [] for name in gauged}
        for name, neurons in produced.items():
            shared = [n for n in neurons if self.neuron_layers[n] != name]
            if shared:
                firsts = sorted({self.neuron_layers[n] for n in shared})
                notes[name].append(
                    f"{len(shared)} shared with neurons first produced by "
                    f"{', '.join(repr(x) for x in firsts)} (outputs joined, e.g. by a residual sum)"
                )
        for e in self.excluded:
            notes.setdefault(e.module, []).append(f"{len(e.channels)} excluded: {e.reason}")
        order = {m: i for i, m in enumerate(_module_of(n) for n in reversed(self.param_order))}
        rows = sorted(notes, key=lambda name: -order.get(name, -1))
        width = max([len("layer")] + [len(n) for n in rows])
        head = f"{'layer':<{width}}  channels  neurons  notes"
        lines = [head, "-" * max(len(head), 60)]
        for name in rows:
            lines.append(
                f"{name:<{width}}  {gauged.get(name, 0):>8}  {self.layer_counts.get(name, 0):>7}"
                f"  {'; '.join(notes[name])}"
            )
        lines.append("-" * max(len(head), 60))
        excluded = sum(len(e.channels) for e in self.excluded)
        lines.append(
            f"{self.num_neurons} gauge neurons over {len(self.params)} parameters; "
            f"{excluded} producing channels excluded"
        )
        return "\n".join(lines)

    # -- binding to a model -------------------------------------------------------------------
    def bind(self, source: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
        """The tensors of ``source`` (a model, or a mapping name -> tensor such as gradients) that
        the structure touches, checked against the structure's names and shapes."""
        if isinstance(source, nn.Module):
            named = dict(source.named_parameters())
        elif isinstance(source, dict):
            named = source
        else:
            raise TypeError(f"expected an nn.Module or a dict of tensors, got {type(source)}")
        out = {}
        for name, m in self.params.items():
            t = named.get(name)
            if t is None:
                raise ValueError(f"the structure does not match: no parameter '{name}'")
            if not isinstance(t, Tensor) or tuple(t.shape) != m.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"the structure does not match: '{name}' has shape {shape}, expected {m.shape}"
                )
            out[name] = t
        return out

    def restrict(self, keep: Tensor, reason: str) -> GaugeStructure:
        """The structure of the subgroup generated by the neurons with ``keep[n]`` (bool
        ``[num_neurons]``): kept neurons renumbered in order, the others ``-1`` in every map,
        parameters no kept neuron touches dropped, and the producing channels of the dropped
        neurons added to ``excluded`` with ``reason``."""
        keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1).cpu()
        if keep.numel() != self.num_neurons:
            raise ValueError(f"keep has {keep.numel()} entries for {self.num_neurons} neurons")
        # new index of old neuron n at position n + 1; position 0 maps -1 to -1
        new_index = torch.full((self.num_neurons + 1,), -1, dtype=torch.long)
        new_index[1:][keep] = torch.arange(int(keep.sum()))
        dropped = torch.cat([torch.zeros(1, dtype=torch.bool), ~keep])

        def remap(idx: Tensor | None) -> Tensor | None:
            out = None if idx is None else new_index[idx + 1]
            return None if out is None or bool((out < 0).all()) else out

        params, channels = {}, {}
        for name, m in self.params.items():
            lost = None if m.rows is None else torch.nonzero(dropped[m.rows.reshape(-1) + 1])
            if lost is not None and lost.numel():
                channels.setdefault(_module_of(name), set()).update(lost.reshape(-1).tolist())
            rows, cols = remap(m.rows), remap(m.cols)
            if rows is not None or cols is not None:
                params[name] = ParamMap(name, m.shape, rows, cols)
        excluded = self.excluded + [
            Exclusion(module, reason, tuple(sorted(ch))) for module, ch in channels.items()
        ]
        layers = [layer for layer, k in zip(self.neuron_layers, keep.tolist(), strict=True) if k]
        return GaugeStructure(len(layers), params, excluded, layers, self.param_order)

    def device_maps(self, device: torch.device) -> list[DeviceMap]:
        """The index maps on ``device``, with ``-1`` replaced by the dummy slot ``num_neurons``
        (cached: built once per device)."""
        device = torch.device(device)
        if device not in self._device_maps:
            n = self.num_neurons
            self._device_maps[device] = [
                DeviceMap(
                    m.name,
                    None if m.rows is None else _slots(m.rows, n).to(device),
                    None if m.cols is None else _slots(m.cols, n).to(device),
                )
                for m in self.params.values()
            ]
        return self._device_maps[device]

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, strings, numbers): what :meth:`save` writes."""

        def enc(t: Tensor | None) -> Any:
            return None if t is None else {"shape": list(t.shape), "data": t.flatten().tolist()}

        layers = sorted(set(self.neuron_layers))
        index = {name: i for i, name in enumerate(layers)}
        return {
            "format": FORMAT,
            "num_neurons": self.num_neurons,
            "params": [
                {"name": m.name, "shape": list(m.shape), "rows": enc(m.rows), "cols": enc(m.cols)}
                for m in self.params.values()
            ],
            "excluded": [
                {"module": e.module, "reason": e.reason, "channels": list(e.channels)}
                for e in self.excluded
            ],
            "layers": layers,
            "neuron_layers": [index[x] for x in self.neuron_layers],
            "param_order": self.param_order,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GaugeStructure:
        """The structure :meth:`to_dict` described; ``ValueError`` for any other data."""
        if not isinstance(data, dict):
            raise ValueError(f"not a saved GaugeStructure (a {type(data).__name__}, not a dict)")
        if data.get("format") != FORMAT:
            raise ValueError(f"not a saved GaugeStructure (format {data.get('format')!r})")

        def dec(d: Any) -> Tensor | None:
            return None if d is None else torch.tensor(d["data"], dtype=torch.long).view(d["shape"])

        try:
            params = {
                p["name"]: ParamMap(p["name"], tuple(p["shape"]), dec(p["rows"]), dec(p["cols"]))
                for p in data["params"]
            }
            excluded = [
                Exclusion(e["module"], e["reason"], tuple(e["channels"])) for e in data["excluded"]
            ]
            layers = [data["layers"][i] for i in data["neuron_layers"]]
            return cls(int(data["num_neurons"]), params, excluded, layers, data["param_order"])
        except (KeyError, TypeError, IndexError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"a malformed saved GaugeStructure ({type(err).__name__}: {err})"
            ) from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the structure as JSON (plain data; no code is pickled)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaugeStructure:
        """Read what :meth:`save` wrote; ``ValueError`` naming the file for anything else."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a saved GaugeStructure (not JSON: {err})") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


class DeviceMap(NamedTuple):
    """One parameter's index maps on a device; ``-1`` replaced by the dummy slot ``N``."""

    name: str
    rows: Tensor | None
    cols: Tensor | None


def _slots(idx: Tensor, n: int) -> Tensor:
    return torch.where(idx < 0, torch.full_like(idx, n), idx)


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def compile_structure(model: nn.Module, ctx: TraceContext) -> GaugeStructure:
    """Turn a finished trace into a :class:`GaugeStructure`: connected components of the union
    graph, minus blocked ones and those lacking a producer or a consumer, numbered in parameter
    order."""
    n_nodes = ctx.num_nodes
    edges = torch.cat(ctx.edges, dim=1).numpy() if ctx.edges else np.zeros((2, 0), np.int64)
    graph = coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])), shape=(n_nodes, n_nodes))
    n_comp, comp_np = connected_components(graph, directed=False)
    comp = torch.from_numpy(comp_np.astype(np.int64))

    generic = "mixed with a fixed tensor (model input, buffer or constant)"
    reasons = [r for _, r in ctx.marks] + [generic]
    nodes = torch.cat([n.reshape(-1) for n, _ in ctx.marks] + [torch.zeros(1, dtype=torch.long)])
    which = torch.cat(
        [torch.full((n.numel(),), i) for i, (n, _) in enumerate(ctx.marks)]
        + [torch.tensor([len(reasons) - 1])]
    )
    no_reason = len(reasons)
    comp_reason = torch.full((n_comp,), no_reason).scatter_reduce(
        0, comp[nodes], which, reduce="amin"
    )

    names = [n for n, _ in model.named_parameters()]
    has_in = torch.zeros(n_comp, dtype=torch.bool)
    has_out = torch.zeros(n_comp, dtype=torch.bool)
    for table, flag in ((ctx.rows, has_in), (ctx.cols, has_out)):
        for lab in table.values():
            flag[comp[lab.reshape(-1)]] = True
    valid = (comp_reason == no_reason) & has_in & has_out

    producers = [n for n in names if n in ctx.rows and n in ctx.producers]
    row_comps = [comp[ctx.rows[n].reshape(-1)] for n in producers]
    order = torch.cat(row_comps) if row_comps else torch.zeros(0, dtype=torch.long)
    order = order[valid[order]]
    uniq, inverse = torch.unique(order, return_inverse=True)
    first = torch.full((len(uniq),), len(order)).scatter_reduce(
        0, inverse, torch.arange(len(order)), reduce="amin"
    )
    ranked = uniq[torch.argsort(first)]
    neuron_of_comp = torch.full((n_comp,), -1)
    neuron_of_comp[ranked] = torch.arange(len(ranked))
    num_neurons = len(ranked)

    neuron_layers = [""] * num_neurons
    params: dict[str, ParamMap] = {}
    for name in names:
        shape = tuple(ctx._params[name].shape)
        maps = []
        for table in (ctx.rows, ctx.cols):
            lab = table.get(name)
            idx = None if lab is None else _compact(neuron_of_comp[comp[lab.expand(shape)]])
            maps.append(None if idx is None or bool((idx < 0).all()) else idx.clone())
        if maps[0] is not None or maps[1] is not None:
            params[name] = ParamMap(name, shape, maps[0], maps[1])
    for name in reversed(producers):
        rows = params[name].rows if name in params else None
        if rows is not None:
            for n in rows[rows >= 0].unique().tolist():
                neuron_layers[n] = _module_of(name)

    excluded: dict[tuple[str, str], set[int]] = {}
    for name, comps in zip(producers, row_comps, strict=True):
        bad = torch.nonzero(~valid[comps]).reshape(-1)
        for ch, c in zip(bad.tolist(), comps[bad].tolist(), strict=True):
            r = int(comp_reason[c])
            if r < no_reason:
                why = reasons[r]
            elif not has_out[c]:
                why = "not consumed by any parameter (its output is unused)"
            else:
                why = "no producing parameter"
            excluded.setdefault((_module_of(name), why), set()).add(ch)
    exclusions = [Exclusion(m, r, tuple(sorted(ch))) for (m, r), ch in excluded.items()]
    return GaugeStructure(num_neurons, params, exclusions, neuron_layers, names)
