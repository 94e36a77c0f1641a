"""``GaugeStructure``: the rescaling group of a model, compiled to signed terms per parameter.

A generator ``n`` acts on parameter entry ``e`` with an integer weight ``w_n(e)`` in
``{-1, 0, 1}``: under ``h`` (one log-scale per generator), ``theta_e -> exp(sum_n w_n(e) h_n)
theta_e``. Per parameter the weights are stored as a few *terms* ``(index, sign)``: ``index`` is
an int64 tensor broadcastable to the parameter naming one generator per entry (``-1``: none), and
the entry's exponent is ``sum over terms of sign * h[index[e]]``. A Linear layer's weight between
two ReLU layers has the term ``(rows [out, 1], +1)`` (its output neurons multiply it) and the term
``(cols [1, in], -1)`` (its input neurons divide it); a key projection's rows carry the query-key
generator with sign ``-1``; a gated MLP's down projection has two ``-1`` column terms.

Invariant: at every entry the terms of a parameter name pairwise distinct generators, so
``w_n(e)`` is the sign of the one term naming ``n`` there (or 0).
"""

from __future__ import annotations

import json
import operator
import os
from collections import Counter
from collections.abc import Collection, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from gaugefix.errors import first_line
from gaugefix.files import write_text
from gaugefix.structure.context import WEIGHT_NORM_DIRECTION, compact
from gaugefix.structure.structure_file import (
    channels,
    check_tables,
    check_terms,
    count,
    decode,
    encode,
    read_aliases,
    read_exclusions,
    read_gain_channels,
    read_layers,
    read_module_types,
    read_params,
    read_produced,
    strings,
    terms_v1,
    terms_v2,
)
from gaugefix.structure.terms import KINDS, Exclusion, ParamTerms, Term, module_of

__all__ = [
    "aliases",
    "check_structure",
    "GaugeStructure",
    "GeneratorEntries",
    "looked_through",
    "unwrap_model",
    "wrappers",
    "PlannedParam",
    "PlannedTerm",
    "UNUSED_NOTE",
]

FORMAT = "gaugefix.GaugeStructure/2"
FORMAT_V1 = "gaugefix.GaugeStructure/1"

# The kinds whose generators scale the query side against the key side of attention scores.
PAIRED_KINDS = ("rotary pair", "query-key")
# What a structure's note says before the parameters a value-dependent trace did not use (read
# back by ``gaugefix.scale_groups``, also from a saved structure).
UNUSED_NOTE = "parameters not used on it: "


_WITH_GAIN = "counted with the gain's channels"  # a weight norm's direction, see summary()


class GeneratorEntries(NamedTuple):
    """The parameter entries generator ``n`` multiplies (``incoming``, ``w_n = +1``) and divides
    (``outgoing``, ``w_n = -1``): ``(parameter name, index)`` pairs, where ``index`` has one
    element per dim of the parameter, an int or ``None`` for every entry along that dim."""

    incoming: list[tuple[str, tuple[int | None, ...]]]
    outgoing: list[tuple[str, tuple[int | None, ...]]]


class PlannedTerm(NamedTuple):
    """A term on a device, with ``-1`` replaced by the dummy slot ``num_generators`` (whose
    coordinate is always 0), ready for gathers and ``index_add_``."""

    slots: Tensor
    sign: int


class PlannedParam(NamedTuple):
    name: str
    shape: tuple[int, ...]
    terms: tuple[PlannedTerm, ...]


class GaugeStructure:
    """The diagonal positive rescaling symmetries of one model.

    ``num_generators`` generators; ``params`` maps each parameter some generator acts on to its
    :class:`ParamTerms`; ``generator_layers[n]`` names the module that first produces generator
    ``n`` and ``generator_kinds[n]`` its kind (one of :data:`KINDS`); ``produced`` maps each
    producing parameter to the generator of each channel it produces (``-1``: not a generator),
    for reports; ``excluded`` lists, per producing module, the channels that are not generators
    with the reason; ``notes`` holds caveats of the trace (e.g. the value reads accepted with
    ``allow_value_dependent=True``); ``in_out`` names the 2-D weights whose module type stores
    them ``[in, out]`` (Hugging Face's ``Conv1D``, embeddings), for :meth:`scale_groups`;
    ``aliases`` maps each parameter the model holds under several names (``ln2.bias =
    ln1.bias``, tied embeddings) from its name in ``param_order`` to its other names, in the
    order of ``named_parameters(remove_duplicate=False)`` (``None``: not recorded, for
    structures saved before aliases were); ``module_types`` maps each module's name (``""``:
    the model itself) to its class's name (``None``: not recorded, for structures saved before
    they were); ``gain_channels`` maps each producing gain whose ``produced`` table lists its
    gains, not its layer's output channels (a weight norm's gain per column or for the whole
    weight: every output channel has the one generator of the gains), to that number of
    channels.
    """

    def __init__(
        self,
        num_generators: int,
        params: dict[str, ParamTerms],
        excluded: list[Exclusion],
        generator_layers: list[str],
        generator_kinds: list[str],
        produced: dict[str, Tensor],
        param_order: list[str],
        notes: tuple[str, ...] = (),
        in_out: frozenset[str] = frozenset(),
        aliases: dict[str, tuple[str, ...]] | None = None,
        module_types: dict[str, str] | None = None,
        gain_channels: dict[str, int] | None = None,
    ) -> None:
        self.num_generators = num_generators
        self.params = params
        self.excluded = excluded
        self.generator_layers = generator_layers
        self.generator_kinds = generator_kinds
        self.produced = produced
        self.param_order = param_order
        self.notes = notes
        self.in_out = in_out
        self.aliases = aliases
        self.module_types = module_types
        self.gain_channels = dict(gain_channels or {})
        self._plans: dict[torch.device, list[PlannedParam]] = {}
        self._most: int | None = None  # most_terms(), found at its first call

    def __repr__(self) -> str:
        return (
            f"GaugeStructure(num_generators={self.num_generators}, params={len(self.params)}, "
            f"excluded={self._exclusion_notes()[1]} channels)"
        )

    def __getstate__(self) -> dict[str, Any]:
        """The fields without the caches: the per-device plans (tensors on devices the
        unpickling process may lack) and :meth:`most_terms`."""
        return {**self.__dict__, "_plans": {}, "_most": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A pickle of a version without ``aliases`` or ``module_types`` has them not
        recorded, and one without ``gain_channels`` has none."""
        defaults = {"aliases": None, "module_types": None, "gain_channels": {}, "_most": None}
        self.__dict__.update({**defaults, **state})

    # -- inspection ---------------------------------------------------------------------------
    def generator(self, n: int) -> GeneratorEntries:
        """The parameter entries generator ``n`` multiplies and divides (``n``: an int, a numpy
        integer or a 0-dim integer tensor; ``TypeError`` for a bool or a float)."""
        n = _generator_index(n)
        if not 0 <= n < self.num_generators:
            raise IndexError(f"generator {n} out of range [0, {self.num_generators})")
        incoming, outgoing = [], []
        for p in self.params.values():
            for term in p.terms:
                out = incoming if term.sign > 0 else outgoing
                for i in torch.nonzero(term.index == n).tolist():
                    idx = tuple(None if term.index.shape[d] == 1 else v for d, v in enumerate(i))
                    out.append((p.name, idx))
        return GeneratorEntries(incoming, outgoing)

    def kind_counts(self) -> dict[str, int]:
        """How many generators of each kind (kinds with none left out)."""
        counts = Counter(self.generator_kinds)
        return {k: counts[k] for k in KINDS if counts[k]}

    def _shared_note(self, shared: list[int]) -> str:
        """The summary's note on a layer's channels whose generators another layer produces
        first: the key side of query-key (or rotary) pairs, scaled against the queries, or
        outputs joined to that layer's (a residual sum, a concatenation)."""
        firsts = ", ".join(repr(x) for x in sorted({self.generator_layers[n] for n in shared}))
        if {self.generator_kinds[n] for n in shared} <= set(PAIRED_KINDS):
            return f"{len(shared)} paired against {firsts} (the divided side of attention pairs)"
        return (
            f"{len(shared)} shared with generators first produced by {firsts} "
            "(outputs joined, e.g. by a residual sum)"
        )

    def summary(self) -> str:
        """A table per producing layer: its channels, the output channels it produces that
        belong to generators (the most over its producing parameters: a weight's rows, a
        weight norm's gains per row, or, for gains per column or one for the whole weight,
        every output channel, which all carry the gains' one generator; a generator shared
        through a residual connection counts in every layer producing it), the generators it
        is the first producer of, by kind, and notes: the channels whose generators another
        layer produces first, and the channels excluded, with the reason (see
        :meth:`_exclusion_notes` for a weight norm's direction)."""
        gauged: dict[str, int] = {}
        produced: dict[str, set[int]] = {}
        for name, index in self.produced.items():
            module = module_of(name)
            gauged[module] = max(gauged.get(module, 0), self._gauged_channels(name))
            produced.setdefault(module, set()).update(index[index >= 0].tolist())
        kinds: dict[str, Counter] = {}
        for layer, kind in zip(self.generator_layers, self.generator_kinds, strict=True):
            kinds.setdefault(layer, Counter())[kind] += 1
        notes: dict[str, list[str]] = {name: [] for name in gauged}
        for name, generators in produced.items():
            shared = [n for n in generators if self.generator_layers[n] != name]
            if shared:
                notes[name].append(self._shared_note(shared))
        excluded_notes, excluded = self._exclusion_notes()
        for module, texts in excluded_notes.items():
            notes.setdefault(module, []).extend(texts)
        order = {m: i for i, m in enumerate(module_of(n) for n in reversed(self.param_order))}
        rows = sorted(notes, key=lambda name: -order.get(name, -1))
        width = max([len("layer")] + [len(n) for n in rows])
        head = f"{'layer':<{width}}  channels  generators  notes"
        lines = [head, "-" * max(len(head), 60)]
        for name in rows:
            count = kinds.get(name, Counter())
            shown = ", ".join(f"{count[k]} {k}" for k in KINDS if count[k])
            note = "; ".join(([shown] if shown and set(count) != {"neuron"} else []) + notes[name])
            row = f"{name:<{width}}  {gauged.get(name, 0):>8}  {sum(count.values()):>10}  {note}"
            lines.append(row.rstrip())  # a row without notes ends at its count
        lines.append("-" * max(len(head), 60))
        by_kind = ", ".join(f"{v} {k}" for k, v in self.kind_counts().items())
        lines.append(
            f"{_counted(self.num_generators, 'generator')} ({by_kind or 'none'}) over "
            f"{_counted(len(self.params), 'parameter')}; "
            f"{_counted(excluded, 'producing channel')} excluded"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _exclusion_notes(self) -> tuple[dict[str, list[str]], int]:
        """Per module, the notes on its excluded channels, and how many producing channels are
        lost. The rows of a weight norm's direction ``v`` (in ``w = g v / ||v||``) are no loss
        where their module has a producing parameter, the gain ``g``: the layer's output
        channels are the gain's, counted by its ``produced`` table (generated) and by the
        module's other exclusions (lost); their note says whether the gain generates all of
        them. Where no parameter of the module produces (the gain is fixed), they are lost."""
        generated: dict[str, bool] = {}
        for name, index in self.produced.items():
            module = module_of(name)
            generated[module] = generated.get(module, True) and bool((index >= 0).all())
        notes: dict[str, list[str]] = {}
        lost = 0
        for e in self.excluded:
            if e.reason.startswith(WEIGHT_NORM_DIRECTION) and e.module in generated:
                how = "generated through the gain" if generated[e.module] else _WITH_GAIN
                notes.setdefault(e.module, []).append(f"{len(e.channels)} {how}: {e.reason}")
            else:
                lost += len(e.channels)
                notes.setdefault(e.module, []).append(f"{len(e.channels)} excluded: {e.reason}")
        return notes, lost

    def _gauged_channels(self, name: str) -> int:
        """The output channels parameter ``name`` produces that belong to generators."""
        index = self.produced[name]
        if name in self.gain_channels:
            return self.gain_channels[name] if bool((index >= 0).any()) else 0
        return int((index >= 0).sum())

    def scale_groups(self) -> list[dict[str, Any]]:
        """The generators that are SmoothQuant/AWQ-style scalings (a layer's output channels
        divided, its readers' input channels multiplied), grouped by module names in
        llm-compressor's mapping convention: see :func:`gaugefix.scale_groups.scale_groups`."""
        from gaugefix.scale_groups import scale_groups

        return scale_groups(self)

    # -- binding to a model -------------------------------------------------------------------
    def bind(
        self, source: nn.Module | dict[str, Tensor], batch_dims: int = 0, *, sharded: bool = False
    ) -> dict[str, Tensor]:
        """The tensors of ``source`` (a model, or a mapping name -> tensor such as gradients)
        that the structure acts on, checked against the structure's names and shapes (after
        ``batch_dims`` leading dims, for stacks of several copies); a model's parameter names
        must be those it was discovered with (a ``torch.compile`` wrapper is looked through,
        as ``discover`` does), and its modules must be those recorded, by name and class (a
        subclass passes): an ``nn.Tanh`` where it had an ``nn.ReLU`` is refused. What the
        forward computes beyond that is not checked: a structure is exact for the model it was
        discovered on, not for another one with the same modules (``F.gelu`` where its forward
        called ``F.relu``). FSDP2-sharded (``DTensor``)
        tensors are refused with one line unless ``sharded``: a caller passing it computes on
        this process's slices (:func:`gaugefix.distributed.local_view`)."""
        if isinstance(source, nn.Module):
            source = looked_through(source)
            named = dict(source.named_parameters())
        elif isinstance(source, dict):
            named = source
        else:
            raise TypeError(f"expected an nn.Module or a dict of tensors, got {type(source)}")
        if isinstance(batch_dims, bool) or not isinstance(batch_dims, int):
            raise TypeError(f"batch_dims must be an int, got {type(batch_dims).__name__}")
        if batch_dims < 0:
            raise ValueError(f"batch_dims must be >= 0, got {batch_dims}")
        out = {}
        for name, p in self.params.items():
            t = named.get(name)
            if t is None:
                raise ValueError(
                    f"the structure does not match: no parameter '{name}'{_prefixed(name, named)}"
                )
            if not isinstance(t, Tensor) or tuple(t.shape[batch_dims:]) != p.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"the structure does not match: '{name}' has shape {shape}, expected {p.shape}"
                )
            out[name] = t
        if isinstance(source, nn.Module):
            self._check_names(named)
            self._check_aliases(source)
            self._check_module_types(source)
        if not sharded:
            from gaugefix.distributed import refuse_sharded

            refuse_sharded(out)
        return out

    def _check_names(self, named: dict[str, Tensor]) -> None:
        """A model's parameters must be those the structure was discovered with (``param_order``):
        one with another parameter, one lacking one, or one with a weight tied or untied since
        (a tied weight is one parameter) is another model."""
        order = set(self.param_order)
        if named.keys() != order:
            extra = [n for n in named if n not in order]
            missing = [n for n in self.param_order if n not in named]
            raise ValueError(
                "the structure does not match: the model's parameters are not those it was "
                f"discovered with (new: {extra[:3]}, missing: {missing[:3]}; a weight tied or "
                "untied since?)"
            )

    def _check_aliases(self, model: nn.Module) -> None:
        """A model holding its parameters under other names than those recorded (a weight tied
        to another tensor since, which keeps ``named_parameters`` as it was) is another model."""
        if self.aliases is None:
            return
        found = aliases(model)
        if found != self.aliases:
            changed = sorted(
                n for n in found.keys() | self.aliases if found.get(n) != self.aliases.get(n)
            )
            raise ValueError(
                "the structure does not match: the model ties its parameters otherwise than the "
                f"one it was discovered on ({changed[0]!r} is held as "
                f"{[changed[0], *found.get(changed[0], ())]}, was "
                f"{[changed[0], *self.aliases.get(changed[0], ())]}; a weight tied since?)"
            )

    def _check_module_types(self, model: nn.Module) -> None:
        """A model whose modules are not those recorded, by name and class (an ``nn.Tanh``
        where the structure's model had an ``nn.ReLU``: the same parameters, another group), is
        another model. A subclass of the recorded class passes (FSDP2's ``FSDPLinear``). No
        other class does, even one computing the same function (an ``nn.Identity`` for an
        ``nn.Dropout``): a class name does not say what a class computes (a model's own
        ``Dropout`` may permute channels), so the model is discovered again."""
        if self.module_types is None:
            return
        found = dict(model.named_modules())
        if found.keys() != self.module_types.keys():
            diff = sorted(found.keys() ^ self.module_types.keys())
            raise ValueError(
                "the structure does not match: the model's modules are not those it was "
                f"discovered with ({diff[0]!r} is new or missing); discover its structure again"
            )
        for name, recorded in self.module_types.items():
            if recorded not in (c.__name__ for c in type(found[name]).__mro__):
                raise ValueError(
                    f"the structure does not match: module {name!r} is a "
                    f"{type(found[name]).__name__}, was a {recorded} (another function, another "
                    "symmetry group); discover its structure again on this model (the recorded "
                    "class names cannot show two classes equivalent)"
                )

    def plan(self, device: torch.device | str) -> list[PlannedParam]:
        """The terms on ``device`` with ``-1`` replaced by the dummy slot ``num_generators``
        (cached: built once per device)."""
        device = torch.device(device)
        if device not in self._plans:
            n = self.num_generators
            self._plans[device] = [
                PlannedParam(
                    p.name,
                    p.shape,
                    tuple(
                        PlannedTerm(torch.where(t.index < 0, n, t.index).to(device), t.sign)
                        for t in p.terms
                    ),
                )
                for p in self.params.values()
            ]
        return self._plans[device]

    def touching(self, names: Collection[str]) -> Tensor:
        """Bool ``[num_generators]``: the generators acting on entries of the named parameters
        (a collection of names of ``param_order``, not one string; ``ValueError`` for another
        name, such as a module's)."""
        if isinstance(names, str):
            raise TypeError(
                f"touching takes a collection of parameter names, not the string {names!r}"
            )
        names = set(names)  # read once: an iterator would be consumed by the first test
        if not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"touching takes parameter names (strings), got {sorted(map(repr, names))}"
            )
        unknown = sorted(names - set(self.param_order))
        if unknown:
            raise ValueError(
                f"touching: {unknown[0]!r} is not a parameter of the structure's model (a "
                "parameter's full name, such as 'fc1.weight', not a module's)"
            )
        touched = torch.zeros(self.num_generators + 1, dtype=torch.bool)
        for param in self.plan("cpu"):
            if param.name in names:
                for term in param.terms:
                    touched[term.slots.reshape(-1)] = True
        return touched[: self.num_generators]

    def most_terms(self) -> int:
        """The most terms of any parameter: at most this many generators act on one entry
        (found once: a structure's parameters and terms do not change)."""
        if self._most is None:
            self._most = max((len(p.terms) for p in self.params.values()), default=0)
        return self._most

    def sum_over_shards(self, *partial: Tensor) -> tuple[Tensor, ...]:
        """Sums over the entries of this structure's parameters, completed over every process
        holding a slice of them: unchanged here (whole parameters); a
        :class:`gaugefix.distributed.ShardStructure` all-reduces them."""
        return partial

    # -- subgroups --------------------------------------------------------------------------------
    def restrict(self, keep: Tensor, reason: str) -> GaugeStructure:
        """The structure of the subgroup generated by the generators with ``keep[n]`` (a bool
        tensor ``[num_generators]``), renumbered in order; parameters no kept generator acts on
        are dropped, and the producing channels of the dropped generators are added to
        ``excluded`` with ``reason``."""
        try:
            keep = torch.as_tensor(keep).cpu()
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as err:
            raise TypeError(
                f"restrict takes a bool mask, got a {type(keep).__name__} ({first_line(err)})"
            ) from None
        if (keep.dtype != torch.bool and keep.numel()) or not isinstance(reason, str):
            raise TypeError(
                f"restrict takes a bool mask and a reason string, got a {keep.dtype} tensor "
                f"and a {type(reason).__name__}"
            )
        keep = keep.to(torch.bool)  # an empty list is a float tensor
        if tuple(keep.shape) != (self.num_generators,):
            raise ValueError(
                f"keep must have shape ({self.num_generators},), got {tuple(keep.shape)}"
            )
        new = torch.full((self.num_generators + 1,), -1, dtype=torch.long)
        new[: self.num_generators][keep] = torch.arange(int(keep.sum()))

        def renumber(index: Tensor) -> Tensor:
            return compact(new[index].clone())

        params = {}
        for p in self.params.values():
            terms = tuple(Term(renumber(t.index), t.sign) for t in p.terms)
            terms = tuple(t for t in terms if bool((t.index >= 0).any()))
            if terms:
                params[p.name] = ParamTerms(p.name, p.shape, terms)
        channels: dict[str, set[int]] = {}
        for name, index in self.produced.items():
            lost = torch.nonzero((index >= 0) & (new[index] < 0)).reshape(-1).tolist()
            if lost:  # a gain per column or for the whole weight: its one generator, all rows
                rows = range(self.gain_channels[name]) if name in self.gain_channels else lost
                channels.setdefault(module_of(name), set()).update(rows)
        excluded = self.excluded + [
            Exclusion(module, reason, tuple(sorted(ch))) for module, ch in channels.items()
        ]
        kept = keep.tolist()
        return GaugeStructure(
            int(keep.sum()),
            params,
            excluded,
            [x for x, k in zip(self.generator_layers, kept, strict=True) if k],
            [x for x, k in zip(self.generator_kinds, kept, strict=True) if k],
            {name: new[index] for name, index in self.produced.items()},
            self.param_order,
            self.notes,
            self.in_out,
            self.aliases,
            self.module_types,
            self.gain_channels,
        )

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, strings, numbers): what :meth:`save` writes."""
        layers = sorted(set(self.generator_layers))
        index = {name: i for i, name in enumerate(layers)}
        data = {
            "format": FORMAT,
            "num_generators": self.num_generators,
            "params": [
                {
                    "name": p.name,
                    "shape": list(p.shape),
                    "terms": [{"sign": t.sign, "index": encode(t.index)} for t in p.terms],
                }
                for p in self.params.values()
            ],
            "produced": {name: encode(index) for name, index in self.produced.items()},
            "excluded": [
                {"module": e.module, "reason": e.reason, "channels": list(e.channels)}
                for e in self.excluded
            ],
            "layers": layers,
            "generator_layers": [index[x] for x in self.generator_layers],
            "generator_kinds": self.generator_kinds,
            "param_order": self.param_order,
            "notes": list(self.notes),
            "in_out": sorted(self.in_out),
        }
        if self.aliases is not None:
            data["aliases"] = {name: list(other) for name, other in self.aliases.items()}
        if self.module_types is not None:
            data["module_types"] = dict(self.module_types)
        if self.gain_channels:
            data["gain_channels"] = dict(self.gain_channels)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> GaugeStructure:
        """The structure :meth:`to_dict` wrote (this format, or version 1's rows and columns);
        ``ValueError`` naming the problem for anything else, including data that is not
        consistent (a term that does not fit its parameter, a generator out of range, one that
        does not both multiply and divide some entries, two terms naming one generator at one
        entry, a produced table contradicting its parameter's shape or the generators' layers).
        The data is checked for consistency, not against a model: a structure is exact
        for the model it was discovered on."""
        if not isinstance(data, dict):
            raise ValueError(f"not a saved GaugeStructure (a {type(data).__name__}, not a dict)")
        fmt = data.get("format")
        if fmt not in (FORMAT, FORMAT_V1):
            raise ValueError(f"not a saved GaugeStructure (format {fmt!r})")
        try:
            return cls._from_v2(data) if fmt == FORMAT else cls._from_v1(data)
        except KeyError as err:
            raise ValueError(f"a malformed saved GaugeStructure (no key {err})") from None
        except (TypeError, ValueError, IndexError, RuntimeError) as err:
            raise ValueError(f"a malformed saved GaugeStructure ({first_line(err)})") from None

    @classmethod
    def _from_v2(cls, data: dict[str, Any]) -> GaugeStructure:
        params = read_params(data["params"], terms_v2)
        return cls._checked(
            count(data["num_generators"], "num_generators"),
            params,
            read_exclusions(data["excluded"]),
            read_layers(data["layers"], data["generator_layers"]),
            strings(data["generator_kinds"], "generator_kinds"),
            read_produced(data["produced"]),
            strings(data["param_order"], "param_order"),
            tuple(strings(data.get("notes", []), "notes")),
            frozenset(strings(data.get("in_out", []), "in_out")),
            read_aliases(data.get("aliases")),
            read_module_types(data.get("module_types")),
            read_gain_channels(data.get("gain_channels", {})),
        )

    @classmethod
    def _from_v1(cls, data: dict[str, Any]) -> GaugeStructure:
        """Version 1 stored one multiplying map (``rows``) and one dividing map (``cols``) per
        parameter: the terms with signs +1 and -1, which cancel where they name one generator
        (a layer applied to its own output)."""
        params = read_params(data["params"], terms_v1)
        stored = sum(len(p[k]["data"]) for p in data["params"] for k in ("rows", "cols") if p[k])
        produced = {
            p["name"]: channels(
                decode(p["rows"], f"the rows of '{p['name']}'"), params[p["name"]].shape, stored
            )
            for p in data["params"]
            if p["rows"] is not None
        }
        layers = read_layers(data["layers"], data["neuron_layers"])
        return cls._checked(
            count(data["num_neurons"], "num_neurons"),
            params,
            read_exclusions(data["excluded"]),
            layers,
            ["neuron"] * len(layers),
            produced,
            strings(data["param_order"], "param_order"),
        )

    @classmethod
    def _checked(cls, n: int, params: dict[str, ParamTerms], *rest: Any) -> GaugeStructure:
        """The structure of the data read, once it is consistent (else ``ValueError``)."""
        structure = cls(n, params, *rest)
        check_terms(structure)
        check_tables(structure)
        return structure

    def save(self, path: str | os.PathLike) -> None:
        """Write the structure as JSON (plain data; no code is pickled), whole or not at all
        (:func:`gaugefix.files.write_text`)."""
        write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaugeStructure:
        """Read a structure :meth:`save` wrote; ``ValueError`` naming the file for a file that
        is not one."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(
                f"{os.fspath(path)} is not a saved GaugeStructure (not JSON: {first_line(err)})"
            ) from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)}: {err}") from None


def _counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (``"1 generator"``, ``"2 generators"``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _generator_index(n: Any) -> int:
    """``n`` as an int: an int, a numpy integer or a 0-dim integer tensor; ``TypeError`` for
    anything else, bools included (an ``int`` subclass, yet no index)."""
    integer = not isinstance(n, bool | np.bool_)
    if isinstance(n, Tensor):
        integer = n.dim() == 0 and not n.is_meta and n.dtype != torch.bool
        integer = integer and not (n.is_floating_point() or n.is_complex())
    try:
        if integer:
            return operator.index(n)
    except TypeError:
        pass
    what = (
        f"a {n.dtype} tensor of shape {tuple(n.shape)} on {n.device}"
        if isinstance(n, Tensor)
        else f"{n!r} ({type(n).__name__})"
    )
    raise TypeError(
        f"a generator index must be an int (or a numpy integer or 0-dim integer tensor), got {what}"
    )


def wrappers(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and each module it wraps, outermost first: ``DistributedDataParallel`` and
    ``DataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers are looked
    through."""
    while True:
        yield model
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return


def check_structure(value: object) -> GaugeStructure:
    """``value``, or a one-line ``TypeError`` unless it is a :class:`GaugeStructure`."""
    if not isinstance(value, GaugeStructure):
        raise TypeError(f"structure must be a GaugeStructure, got {type(value).__name__}")
    return value


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameter names a structure refers to: ``model`` with its
    ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers looked
    through (what :func:`gaugefix.discover` traces and :class:`gaugefix.GaugeFixing` binds)."""
    *_, inner = wrappers(model)
    return inner


def looked_through(model: nn.Module) -> nn.Module:
    """``model`` inside its ``torch.compile`` wrappers (``OptimizedModule``: its parameters
    under the prefix ``_orig_mod.``), as :meth:`GaugeStructure.bind` sees it. A replica
    wrapper (``DistributedDataParallel``, ``DataParallel``) is not looked through there: a
    function moving a model takes the replica (``ddp.module``)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _prefixed(name: str, named: dict[str, Any]) -> str:
    """A hint naming the prefix where ``named`` has ``name`` under one (a wrapper's name, as in
    a state dict saved from ``DistributedDataParallel`` or ``torch.compile``), else ``""``."""
    key = next((k for k in named if k.endswith(f".{name}")), None)
    if key is None:
        return ""
    return f" (there is '{key}': the names carry the prefix {key[: -len(name)]!r}, a wrapper's?)"


def aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Per parameter the model holds under several names, its first name (the one
    ``named_parameters`` gives) to the others."""
    first: dict[int, str] = {}
    other: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), name)
        if key != name:
            other.setdefault(key, []).append(name)
    return {name: tuple(names) for name, names in other.items()}
