"""Reading a saved ``GaugeStructure`` (:meth:`GaugeStructure.to_dict`'s plain data, this format
or version 1's) and checking that what was read is consistent."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from gaugefix.structure.context import compact
from gaugefix.structure.terms import (
    KINDS,
    Exclusion,
    ParamTerms,
    Term,
    cancel_opposite,
    collisions,
    module_of,
)

if TYPE_CHECKING:
    from gaugefix.structure.gauge_structure import GaugeStructure

__all__ = [
    "channels",
    "check_tables",
    "check_terms",
    "count",
    "decode",
    "encode",
    "read_aliases",
    "read_exclusions",
    "read_gain_channels",
    "read_layers",
    "read_module_types",
    "read_params",
    "read_produced",
    "strings",
    "terms_v1",
    "terms_v2",
]


# The most entries of the table a version-1 file's row and column maps are combined into where
# they name one generator at one entry (2 GiB of int64): beyond, the file is refused.
V1_CANCEL_LIMIT = 1 << 28


def channels(rows: Tensor, shape: tuple[int, ...], stored: int) -> Tensor:
    """A version-1 row map as the generator of each output channel (dim 0). A map broadcast
    along dim 0 stands for ``shape[0]`` copies of its row: ``ValueError`` where that is more
    than the ``stored`` entries of all the file's maps (a shape no tensor of the file backs,
    whose table alone could exhaust the memory)."""
    if not shape:
        return rows.reshape(-1)
    spread = rows.expand(shape)  # a view: no entry is copied
    if spread.stride(0) == 0 and shape[0] > max(stored, 1):
        raise ValueError(
            f"a parameter of shape {shape} has more channels than the file's maps ({stored})"
        )
    return spread[(slice(None),) + (0,) * (len(shape) - 1)].clone()


def encode(t: Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "data": t.flatten().tolist()}


def decode(d: Any, what: str) -> Tensor:
    """A tensor :func:`encode` wrote: int64, entries ``>= -1``."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a map of shape and data")
    shape = _integers(d["shape"], f"the shape of {what}").tolist()
    data = _integers(d["data"], f"the data of {what}", low=-1)
    if data.numel() != math.prod(shape):
        raise ValueError(
            f"{what} has {data.numel()} entries, not the {math.prod(shape)} of {shape}"
        )
    return data.view(shape)


def _integers(value: Any, what: str, low: int = 0) -> Tensor:
    """``value``, a list of integers ``>= low``, as an int64 tensor (else ``ValueError``)."""
    listed = isinstance(value, list | tuple)
    try:
        array = np.asarray(value) if listed and value else np.zeros(0, np.int64)
    except ValueError:  # ragged nested lists
        array = np.zeros((0, 0))
    if not listed or array.ndim != 1 or array.dtype.kind != "i":
        raise ValueError(f"{what} must be a list of integers")
    if array.size and int(array.min()) < low:
        raise ValueError(f"{what} has {int(array.min())}, below {low}")
    return torch.from_numpy(array.astype(np.int64))


def count(value: Any, what: str) -> int:
    """``value``, a non-negative int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return list(value)


def read_params(entries: Any, read_terms: Any) -> dict[str, ParamTerms]:
    """The saved parameters by name, with their terms read by ``read_terms(entry, name)``."""
    if not isinstance(entries, list | tuple):
        raise ValueError("params must be a list")
    params: dict[str, ParamTerms] = {}
    for p in entries:
        name = p["name"]
        if not isinstance(name, str) or name in params:
            raise ValueError(f"parameter name {name!r} is not a string or appears twice")
        shape = tuple(_integers(p["shape"], f"the shape of '{name}'").tolist())
        params[name] = ParamTerms(name, shape, tuple(read_terms(p, name)))
    return params


def terms_v2(p: dict[str, Any], name: str) -> list[Term]:
    if not isinstance(p["terms"], list | tuple):
        raise ValueError(f"the terms of '{name}' must be a list")
    terms = []
    for t in p["terms"]:
        sign = t["sign"]
        if sign not in (1, -1) or not isinstance(sign, int) or isinstance(sign, bool):
            raise ValueError(f"a term of '{name}' has sign {sign!r}, not 1 or -1")
        terms.append(Term(decode(t["index"], f"a term of '{name}'"), sign))
    return terms


def terms_v1(p: dict[str, Any], name: str) -> list[Term]:
    maps = [
        (decode(p[key], f"the {key} of '{name}'"), sign)
        for key, sign in (("rows", 1), ("cols", -1))
        if p[key] is not None
    ]
    if len(maps) == 2 and maps[0][0].dim() == maps[1][0].dim():  # else check_terms says why
        _check_cancel_table(maps[0][0], maps[1][0], name)
        maps = [(compact(m).clone(), s) for m, s in cancel_opposite(maps)]
    return [Term(m, s) for m, s in maps if bool((m >= 0).any())]


def _check_cancel_table(rows: Tensor, cols: Tensor, name: str) -> None:
    """``ValueError`` where a version-1 parameter's row and column maps name one generator at
    some entry (a layer applied to its own output) and the table cancelling it there, of the
    maps' broadcast shape, has more than :data:`V1_CANCEL_LIMIT` entries."""
    size = math.prod(torch.broadcast_shapes(rows.shape, cols.shape))
    if size > V1_CANCEL_LIMIT and collisions(rows, cols).numel():
        raise ValueError(
            f"the rows and cols of '{name}' name one generator at some entry, and cancelling "
            f"it there takes a table of {size} entries, more than {V1_CANCEL_LIMIT} (refused)"
        )


def read_exclusions(entries: Any) -> list[Exclusion]:
    if not isinstance(entries, list | tuple):
        raise ValueError("excluded must be a list")
    out = []
    for e in entries:
        module, reason = e["module"], e["reason"]
        if not (isinstance(module, str) and isinstance(reason, str)):
            raise ValueError("an exclusion's module and reason must be strings")
        channels = _integers(e["channels"], f"the excluded channels of '{module}'")
        out.append(Exclusion(module, reason, tuple(channels.tolist())))
    return out


def read_aliases(aliases: Any) -> dict[str, tuple[str, ...]] | None:
    """The other names of each tied parameter (``None``: a file written before they were)."""
    if aliases is None:
        return None
    if not isinstance(aliases, dict):
        raise ValueError("aliases must be a map")
    return {
        name: tuple(strings(other, f"the aliases of {name!r}")) for name, other in aliases.items()
    }


def read_module_types(types: Any) -> dict[str, str] | None:
    """Each module's class name (``None``: a file written before they were recorded)."""
    if types is None:
        return None
    if not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values()):
        raise ValueError("module_types must map module names to class names")
    return dict(types)


def read_gain_channels(counts: Any) -> dict[str, int]:
    """The output channels of each gain whose produced table lists its gains."""
    if not isinstance(counts, dict):
        raise ValueError("gain_channels must be a map")
    return {name: count(c, f"the channels of the gain {name!r}") for name, c in counts.items()}


def read_layers(layers: Any, which: Any) -> list[str]:
    """The module of each generator: ``layers[which[n]]``."""
    names = strings(layers, "layers")
    index = _integers(which, "the generators' layers").tolist()
    if any(i >= len(names) for i in index):
        raise ValueError(f"a generator's layer is out of range [0, {len(names)})")
    return [names[i] for i in index]


def read_produced(produced: Any) -> dict[str, Tensor]:
    if not isinstance(produced, dict):
        raise ValueError("produced must be a map")
    return {
        name: decode(index, f"the channels '{name}' produces") for name, index in produced.items()
    }


def check_terms(s: GaugeStructure) -> None:
    """Every term fits its parameter and names generators in ``[0, n)`` (or -1), no two terms of
    a parameter name one generator at one entry, and every generator both multiplies and
    divides some entries."""
    n, sides = s.num_generators, ([], [])
    for p in s.params.values():
        if not p.terms:
            raise ValueError(f"'{p.name}' has no terms")
        for t in p.terms:
            if t.index.dim() != len(p.shape) or any(
                a not in (1, b) for a, b in zip(t.index.shape, p.shape, strict=True)
            ):
                raise ValueError(
                    f"a term of '{p.name}' of shape {tuple(t.index.shape)} does "
                    f"not fit its shape {p.shape}"
                )
            if t.index.numel() and int(t.index.max()) >= n:
                raise ValueError(f"a term of '{p.name}' names a generator outside [0, {n})")
            if math.prod(p.shape):
                sides[t.sign < 0].append(t.index[t.index >= 0].unique())
        for i, a in enumerate(p.terms):
            for b in p.terms[i + 1 :] if math.prod(p.shape) else ():
                if collisions(a.index, b.index).numel():
                    raise ValueError(f"two terms of '{p.name}' name one generator at one entry")
    for side, found in zip(("multiply", "divide"), sides, strict=True):
        count = torch.cat(found).unique().numel() if found else 0
        if count != n:
            raise ValueError(f"{n - count} of the {n} generators {side} no parameter entry")


def check_tables(s: GaugeStructure) -> None:
    """The per-generator lists have one entry each, kinds are known, the acted-on parameters
    are in ``param_order`` (whose names are distinct) and produced channels name generators
    in range."""
    n = s.num_generators
    if len(s.generator_layers) != n or len(s.generator_kinds) != n:
        raise ValueError(f"generator layers and kinds must have {n} entries each")
    if not set(s.generator_kinds) <= set(KINDS):
        raise ValueError(f"unknown generator kinds {sorted(set(s.generator_kinds) - set(KINDS))}")
    order = set(s.param_order)
    if len(order) != len(s.param_order) or not s.params.keys() <= order:
        raise ValueError("param_order must name every parameter once, the acted-on ones too")
    if not s.produced.keys() | s.in_out <= order:
        raise ValueError("produced and in_out must name parameters of param_order")
    if not s.gain_channels.keys() <= s.produced.keys():
        raise ValueError("gain_channels must name parameters of produced")
    for name, index in s.produced.items():
        if index.dim() != 1 or (index.numel() and int(index.max()) >= n):
            raise ValueError(f"the channels '{name}' produces must name generators in [0, {n})")
    _check_produced(s)
    if s.aliases is not None:
        _check_alias_table(s.aliases, order)


def _check_produced(s: GaugeStructure) -> None:
    """``produced`` fits the structure: a producing parameter acted on has a whole number of
    its entries per channel it produces (at most one channel per entry), and the module of
    each generator (``generator_layers[n]``) is that of the first parameter in ``param_order``
    producing it (``""`` for a generator none produces), as discovery numbers them."""
    for name, index in s.produced.items():
        shape = s.params[name].shape if name in s.params else (len(index),)
        if len(index) > math.prod(shape) or (len(index) and math.prod(shape) % len(index)):
            raise ValueError(f"the {len(index)} channels '{name}' produces do not fit {shape}")
    expected, modules = _first_producers(s)
    number = {m: i for i, m in enumerate(modules)}
    found = torch.tensor([number.get(m, -1) for m in s.generator_layers], dtype=torch.long)
    wrong = torch.nonzero(expected != found).reshape(-1)
    if wrong.numel():
        n = int(wrong[0])
        raise ValueError(
            f"generator {n}'s layer {s.generator_layers[n]!r} is not the first module "
            f"producing it ({modules[int(expected[n])]!r})"
        )


def _first_producers(s: GaugeStructure) -> tuple[Tensor, list[str]]:
    """Per generator (``[num_generators]``), the index in the returned module names of the
    module of the first parameter in ``param_order`` producing it (``""``, last: none)."""
    order = [name for name in s.param_order if name in s.produced]
    modules = sorted({module_of(name) for name in order} - {""}) + [""]
    number = {m: i for i, m in enumerate(modules)}
    empty = torch.zeros(0, dtype=torch.long)
    gens = torch.cat([s.produced[name] for name in order] + [empty])
    module = torch.cat(
        [torch.full((len(s.produced[name]),), number[module_of(name)]) for name in order]
        + [torch.tensor([len(modules) - 1])]  # the entry "no producer" points at
    )
    n = s.num_generators
    at = torch.where(gens >= 0, gens, n)
    first = torch.full((n + 1,), len(gens)).scatter_reduce(0, at, torch.arange(len(gens)), "amin")
    return module[first[:n]], modules


def _check_alias_table(aliases: dict[str, tuple[str, ...]], order: set[str]) -> None:
    """Each alias list belongs to a parameter of ``param_order``, is not empty, and names
    other names, each once over all lists."""
    other = [a for names in aliases.values() for a in names]
    if (
        not (aliases.keys() <= order and all(aliases.values()))
        or len(set(other)) != len(other)
        or order & set(other)
    ):
        raise ValueError(
            "aliases must map parameters of param_order to other names, each named once"
        )
