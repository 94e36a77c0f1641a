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
import math
import operator
import os
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor, nn

from gaugefix.errors import first_line
from gaugefix.files import write_text
from gaugefix.structure.context import WEIGHT_NORM_DIRECTION, TraceContext, compact

__all__ = [
    "check_structure",
    "compile_structure",
    "Exclusion",
    "GaugeStructure",
    "GeneratorEntries",
    "KINDS",
    "looked_through",
    "unwrap_model",
    "wrappers",
    "module_of",
    "ParamTerms",
    "PlannedParam",
    "PlannedTerm",
    "Term",
    "UNUSED_NOTE",
]

FORMAT = "gaugefix.GaugeStructure/2"
FORMAT_V1 = "gaugefix.GaugeStructure/1"

# The kinds of generators, from the most specific (a generator carrying several tags is shown
# as the first of them).
KINDS = ("rotary pair", "query-key", "value-output", "gated unit", "norm gain", "neuron")
# The kinds whose generators scale the query side against the key side of attention scores.
PAIRED_KINDS = ("rotary pair", "query-key")
# What a structure's note says before the parameters a value-dependent trace did not use (read
# back by ``gaugefix.scale_groups``, also from a saved structure).
UNUSED_NOTE = "parameters not used on it: "
# The most entries of the table a version-1 file's row and column maps are combined into where
# they name one generator at one entry (2 GiB of int64): beyond, the file is refused.
V1_CANCEL_LIMIT = 1 << 28


class Exclusion(NamedTuple):
    """Channels of a producing module that are not generators, and why; for a parameter fixed
    before it produced any channel (read by an op discovery does not handle), the indices
    along its dim 0, with the op that fixed it. A reason names the first op at or after the
    module's own that blocks the channels or channels joined with them (the nearest blocking
    op downstream: a residual stream's projection names the norm that next reads the stream),
    and, when other modules produce channels joined with them, the first of those and how
    many more."""

    module: str
    reason: str
    channels: tuple[int, ...]


class Term(NamedTuple):
    """One signed term of a parameter's rescaling: the entries with ``index[e] = n`` are
    multiplied by ``a_n ** sign`` (``-1``: no generator). ``index``: int64 with the parameter's
    number of dims, broadcastable to its shape (size 1 along dims it does not vary with)."""

    index: Tensor
    sign: int


@dataclass(frozen=True)
class ParamTerms:
    """The terms of one parameter (``shape`` is the parameter's)."""

    name: str
    shape: tuple[int, ...]
    terms: tuple[Term, ...]


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
        found = _aliases(model)
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
                    "terms": [{"sign": t.sign, "index": _encode(t.index)} for t in p.terms],
                }
                for p in self.params.values()
            ],
            "produced": {name: _encode(index) for name, index in self.produced.items()},
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
        params = _read_params(data["params"], _terms_v2)
        return cls._checked(
            _count(data["num_generators"], "num_generators"),
            params,
            _read_exclusions(data["excluded"]),
            _read_layers(data["layers"], data["generator_layers"]),
            _strings(data["generator_kinds"], "generator_kinds"),
            _read_produced(data["produced"]),
            _strings(data["param_order"], "param_order"),
            tuple(_strings(data.get("notes", []), "notes")),
            frozenset(_strings(data.get("in_out", []), "in_out")),
            _read_aliases(data.get("aliases")),
            _read_module_types(data.get("module_types")),
            _read_gain_channels(data.get("gain_channels", {})),
        )

    @classmethod
    def _from_v1(cls, data: dict[str, Any]) -> GaugeStructure:
        """Version 1 stored one multiplying map (``rows``) and one dividing map (``cols``) per
        parameter: the terms with signs +1 and -1, which cancel where they name one generator
        (a layer applied to its own output)."""
        params = _read_params(data["params"], _terms_v1)
        stored = sum(len(p[k]["data"]) for p in data["params"] for k in ("rows", "cols") if p[k])
        produced = {
            p["name"]: _channels(
                _decode(p["rows"], f"the rows of '{p['name']}'"), params[p["name"]].shape, stored
            )
            for p in data["params"]
            if p["rows"] is not None
        }
        layers = _read_layers(data["layers"], data["neuron_layers"])
        return cls._checked(
            _count(data["num_neurons"], "num_neurons"),
            params,
            _read_exclusions(data["excluded"]),
            layers,
            ["neuron"] * len(layers),
            produced,
            _strings(data["param_order"], "param_order"),
        )

    @classmethod
    def _checked(cls, n: int, params: dict[str, ParamTerms], *rest: Any) -> GaugeStructure:
        """The structure of the data read, once it is consistent (else ``ValueError``)."""
        structure = cls(n, params, *rest)
        _check_terms(structure)
        _check_tables(structure)
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


def _channels(rows: Tensor, shape: tuple[int, ...], stored: int) -> Tensor:
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


def _encode(t: Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "data": t.flatten().tolist()}


def _decode(d: Any, what: str) -> Tensor:
    """A tensor :func:`_encode` wrote: int64, entries ``>= -1``."""
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


def _count(value: Any, what: str) -> int:
    """``value``, a non-negative int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return list(value)


def _read_params(entries: Any, read_terms: Any) -> dict[str, ParamTerms]:
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


def _terms_v2(p: dict[str, Any], name: str) -> list[Term]:
    if not isinstance(p["terms"], list | tuple):
        raise ValueError(f"the terms of '{name}' must be a list")
    terms = []
    for t in p["terms"]:
        sign = t["sign"]
        if sign not in (1, -1) or not isinstance(sign, int) or isinstance(sign, bool):
            raise ValueError(f"a term of '{name}' has sign {sign!r}, not 1 or -1")
        terms.append(Term(_decode(t["index"], f"a term of '{name}'"), sign))
    return terms


def _terms_v1(p: dict[str, Any], name: str) -> list[Term]:
    maps = [
        (_decode(p[key], f"the {key} of '{name}'"), sign)
        for key, sign in (("rows", 1), ("cols", -1))
        if p[key] is not None
    ]
    if len(maps) == 2 and maps[0][0].dim() == maps[1][0].dim():  # else _check_terms says why
        _check_cancel_table(maps[0][0], maps[1][0], name)
        maps = [(compact(m).clone(), s) for m, s in _cancel_opposite(maps)]
    return [Term(m, s) for m, s in maps if bool((m >= 0).any())]


def _check_cancel_table(rows: Tensor, cols: Tensor, name: str) -> None:
    """``ValueError`` where a version-1 parameter's row and column maps name one generator at
    some entry (a layer applied to its own output) and the table cancelling it there, of the
    maps' broadcast shape, has more than :data:`V1_CANCEL_LIMIT` entries."""
    size = math.prod(torch.broadcast_shapes(rows.shape, cols.shape))
    if size > V1_CANCEL_LIMIT and _collisions(rows, cols).numel():
        raise ValueError(
            f"the rows and cols of '{name}' name one generator at some entry, and cancelling "
            f"it there takes a table of {size} entries, more than {V1_CANCEL_LIMIT} (refused)"
        )


def _read_exclusions(entries: Any) -> list[Exclusion]:
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


def _read_aliases(aliases: Any) -> dict[str, tuple[str, ...]] | None:
    """The other names of each tied parameter (``None``: a file written before they were)."""
    if aliases is None:
        return None
    if not isinstance(aliases, dict):
        raise ValueError("aliases must be a map")
    return {
        name: tuple(_strings(other, f"the aliases of {name!r}")) for name, other in aliases.items()
    }


def _read_module_types(types: Any) -> dict[str, str] | None:
    """Each module's class name (``None``: a file written before they were recorded)."""
    if types is None:
        return None
    if not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values()):
        raise ValueError("module_types must map module names to class names")
    return dict(types)


def _read_gain_channels(counts: Any) -> dict[str, int]:
    """The output channels of each gain whose produced table lists its gains."""
    if not isinstance(counts, dict):
        raise ValueError("gain_channels must be a map")
    return {name: _count(c, f"the channels of the gain {name!r}") for name, c in counts.items()}


def _read_layers(layers: Any, which: Any) -> list[str]:
    """The module of each generator: ``layers[which[n]]``."""
    names = _strings(layers, "layers")
    index = _integers(which, "the generators' layers").tolist()
    if any(i >= len(names) for i in index):
        raise ValueError(f"a generator's layer is out of range [0, {len(names)})")
    return [names[i] for i in index]


def _read_produced(produced: Any) -> dict[str, Tensor]:
    if not isinstance(produced, dict):
        raise ValueError("produced must be a map")
    return {
        name: _decode(index, f"the channels '{name}' produces") for name, index in produced.items()
    }


def _check_terms(s: GaugeStructure) -> None:
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
                if _collisions(a.index, b.index).numel():
                    raise ValueError(f"two terms of '{p.name}' name one generator at one entry")
    for side, found in zip(("multiply", "divide"), sides, strict=True):
        count = torch.cat(found).unique().numel() if found else 0
        if count != n:
            raise ValueError(f"{n - count} of the {n} generators {side} no parameter entry")


def _check_tables(s: GaugeStructure) -> None:
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


def module_of(param_name: str) -> str:
    """The module path of a parameter name (``"fc1.weight"`` -> ``"fc1"``)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


# -- compiling a trace ----------------------------------------------------------------------------


def _edge_table(ctx: TraceContext) -> tuple[np.ndarray, np.ndarray]:
    """The trace's equalities ``h_a = s h_b`` as one ``[3, e]`` array of rows ``(a, b, s)``, and
    per equality (``[e]``) whether it is a link from gathered positions to the slices they read
    (``TraceContext.slice_links``)."""
    if not ctx.edges:
        return np.zeros((3, 0), np.int64), np.zeros(0, bool)
    lengths = [e.shape[1] for e in ctx.edges]
    links = np.isin(np.arange(len(lengths)), sorted(ctx.slice_links))
    return torch.cat(ctx.edges, dim=1).numpy(), np.repeat(links, lengths)


def _positive_parts(n: int, edges: np.ndarray, links: np.ndarray) -> np.ndarray:
    """The components (``[n]`` labels, numbered in the order of their first nodes) of the ``n``
    nodes under the equalities ``h_a = h_b`` of ``edges`` (``[3, e]`` rows ``(a, b, s)``, ``s =
    1``) other than the ``links`` (``[e]``) from gathered positions to slices: the one pass
    over all nodes that :func:`_signed_components` and :func:`_components_without_slice_links`
    continue on these parts, each with its own remaining equalities."""
    kept = (edges[2] > 0) & ~links
    return _weak_components(edges[0][kept], edges[1][kept], n)  # a row, then a 1-D mask


def _signed_components(
    edges: np.ndarray, links: np.ndarray, part: np.ndarray
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Solve the equalities ``h_a = s h_b`` of ``edges`` (``[3, e]`` rows ``(a, b, s)``; ``links``
    and ``part`` as :func:`_positive_parts` gives them, on ``n = len(part)`` nodes):
    ``(component, sign, conflicted, count)``
    with ``h_node = sign[node] * h_root(component[node])`` for every node (the root: the
    component's first node; components numbered in the order of their roots), and
    ``conflicted[c]`` when some cycle of component ``c`` forces ``h = -h`` (so its coordinate
    is 0).

    On the double cover (nodes ``v+ = v`` and ``v- = v + n``; ``h_a = s h_b`` joins ``a+`` to
    ``b+`` and ``a-`` to ``b-`` for ``s = 1``, ``a+`` to ``b-`` and ``a-`` to ``b+`` for ``s =
    -1``) a component of the equalities is one piece where it is conflicted (``v+`` joined to
    ``v-``) and two sheets otherwise: the nodes whose ``v+`` lies on the root's sheet have sign
    ``+1``, the others ``-1``. All nodes of one whole part (see :func:`_cover_sheets`) have one
    component and sign, so both are found per part: the parts are numbered in the order of
    their first nodes, so a component's first part holds its root."""
    joining = (edges[2] < 0) | links  # the equalities that join parts
    whole, label = _cover_sheets(*(row[joining] for row in edges), part)
    k = len(label) // 2
    plus, minus = label[:k], label[k:]  # the labels of p+ and p- per whole part p
    key = np.minimum(plus, minus)  # one per component
    parts = np.arange(k)
    root = np.full(2 * k, k)
    root[key[::-1]] = parts[::-1]  # the first part of each component
    is_root = root[key] == parts
    number = np.zeros(2 * k, np.int64)
    number[key[is_root]] = np.arange(int(is_root.sum()))
    comp = number[key]
    conflicted = np.zeros(int(is_root.sum()), dtype=bool)
    conflicted[comp[plus == minus]] = True
    sign = np.where(plus == plus[root[key]], 1, -1)
    return (
        torch.from_numpy(comp[whole]),
        torch.from_numpy(sign[whole]),
        torch.from_numpy(conflicted),
        len(conflicted),
    )


def _cover_sheets(
    a: np.ndarray, b: np.ndarray, s: np.ndarray, part: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The components of the double cover of the equalities ``h_a = s h_b`` (``[e]`` each) and
    of those inside ``part`` (components of other equalities with ``s = 1``, numbered in the
    order of their first nodes), on ``len(part)`` nodes: ``(whole, label)``, the whole part of
    every node (``[n]``: its part joined by these equalities with ``s = 1``, again numbered in
    the order of first nodes) and the labels of ``p+ = p`` and ``p- = p + k`` (``[2 k]``) on
    the ``k`` whole parts. The equalities with ``s = 1`` join ``v+`` to ``w+`` exactly where
    they join ``v-`` to ``w-``: the parts joined by them (whole components of every ``s = 1``
    equality) are found once on the nodes, and the cover is solved on those, joined by the
    others. Every node of a whole part has that part's labels."""
    negative = s < 0
    k = int(part.max()) + 1 if len(part) else 0
    whole = part
    if not negative.all():  # parts joined by these equalities with s = 1
        whole = _weak_components(part[a[~negative]], part[b[~negative]], k)[part]
    k = int(whole.max()) + 1 if len(whole) else 0
    pa, pb = whole[a[negative]], whole[b[negative]]  # p+ = p, p- = p + k
    label = _weak_components(np.concatenate([pa, pa + k]), np.concatenate([pb + k, pb]), 2 * k)
    return whole, label


def _components_without_slice_links(
    edges: np.ndarray, links: np.ndarray, part: np.ndarray
) -> Tensor:
    """The component of every node under the equalities ``edges`` other than the ``links``
    from gathered positions to the slices they read (see
    ``TraceContext.block_mismatched_gathers``), numbered in the order of their first nodes:
    the ``part`` s (see :func:`_positive_parts`, numbered so) joined by the other equalities
    (``s = -1``), whose components are numbered in the order of their first parts."""
    kept = (edges[2] < 0) & ~links
    k = int(part.max()) + 1
    return torch.from_numpy(_weak_components(part[edges[0][kept]], part[edges[1][kept]], k)[part])


# The most nodes a graph's int32 indices can number.
INT32_NODES = int(np.iinfo(np.int32).max)


def _weak_components(rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """The connected components of the undirected graph on ``n`` nodes with the edges ``rows[i]
    -- cols[i]`` (``[e]`` each): ``[n]`` int64 labels, numbered in the order of each
    component's first node. Given SciPy int32 indices where they fit (it converts others)."""
    index = np.int32 if n <= INT32_NODES else np.int64
    weights = np.ones(len(rows))  # float64 and compressed: the form SciPy solves on, uncopied
    graph = csr_matrix((weights, (rows.astype(index), cols.astype(index))), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _first_reason(
    ctx: TraceContext, comp: Tensor, count: int, edges: np.ndarray
) -> tuple[Tensor, list[str], Tensor]:
    """Per component, the index into the returned reasons of the first mark that blocked it
    (``len(reasons)`` when none did); node 0 counts as marked with a generic reason."""
    generic = "mixed with a fixed tensor (model input, buffer or constant)"
    reasons = [r for _, r in ctx.marks] + [generic]
    nodes, which = _mark_nodes(ctx)
    first = torch.full((count,), len(reasons)).scatter_reduce(0, comp[nodes], which, reduce="amin")
    return first, reasons, _groups(comp, count, edges)


def _mark_nodes(ctx: TraceContext) -> tuple[Tensor, Tensor]:
    """Every marked node and the index of its mark (``[m]`` each, in the order of the marks),
    node 0 last with the index ``len(ctx.marks)`` (the generic reason)."""
    nodes = torch.cat([m.reshape(-1) for m, _ in ctx.marks] + [torch.zeros(1, dtype=torch.long)])
    which = torch.cat(
        [torch.full((m.numel(),), i) for i, (m, _) in enumerate(ctx.marks)]
        + [torch.tensor([len(ctx.marks)])]
    )
    return nodes, which


def _groups(comp: Tensor, count: int, edges: np.ndarray) -> Tensor:
    """Per node (``[num_nodes]``), the set of joined channels an exclusion's reason speaks of:
    its component, except in node 0's component. That one joins every channel fixed anywhere
    (through node 0, the fixed factor of inputs and constants), so there a node's group is the
    nodes joined to it by the equalities ``edges`` (``[3, e]``) without passing through node 0:
    the components of the graph without node 0's edges, numbered from ``count`` in the order
    of their first nodes. Only node 0's component splits (no equality leaves a component): its
    pieces are found on its own nodes, and numbered among the other components' roots."""
    fixed = (comp == comp[0]).numpy()
    nodes = np.flatnonzero(fixed)  # ascending, node 0 first
    a, b = edges[0], edges[1]
    inside = fixed[a] & (a != 0) & (b != 0)
    local = np.searchsorted(nodes, np.stack([a[inside], b[inside]]))
    piece = _weak_components(local[0], local[1], len(nodes))
    firsts = nodes[_first_occurrences(piece)]  # each piece's first node, ascending
    roots = np.flatnonzero(_first_occurrences(comp.numpy()))  # each component's first node
    below = np.searchsorted(roots, firsts) - (firsts > 0)  # other components' roots before
    group = comp.clone()
    group[torch.from_numpy(nodes)] = torch.from_numpy(count + below + np.arange(len(firsts)))[
        torch.from_numpy(piece)
    ]
    return group


def _first_occurrences(labels: np.ndarray) -> np.ndarray:
    """Whether each entry of ``labels`` (numbered ``0, 1, ...`` in the order of their first
    entries) is its label's first: the labels above every one before it."""
    before = np.maximum.accumulate(labels)
    return labels > np.concatenate([[-1], before[:-1]])


def _mark_keys(ctx: TraceContext, group: Tensor) -> Tensor:
    """Sorted, ``group * (len(ctx.marks) + 1) + mark`` for every mark and group it fixes nodes
    of (node 0's generic reason as mark ``len(ctx.marks)``)."""
    nodes, which = _mark_nodes(ctx)
    return torch.unique(group[nodes] * (len(ctx.marks) + 1) + which)


def _nearest_marks(keys: Tensor, width: int, group: Tensor, start: Tensor) -> Tensor:
    """Per node of ``group`` (its group), from the mark keys (see :func:`_mark_keys`; ``width``:
    the marks with the generic one, which is last), the first mark on its group made at or
    after mark ``start`` (``[k]`` like ``group``: the op nearest after the layer that produced
    the node), else the group's first mark, else the generic reason."""
    found = torch.full(group.shape, width - 1)
    for first in (start, 0):  # the nearest after ``start``, else the first
        at = _sorted_positions(keys, group * width + first).clamp(max=len(keys) - 1)
        hit = (keys[at] // width == group) & (found == width - 1)
        found = torch.where(hit, keys[at] % width, found)
    return found


def _resolved_terms(
    roles: list[tuple[Tensor, int]], comp: Tensor, sign: Tensor
) -> list[tuple[Tensor, int]]:
    """A parameter's role terms as ``(component map, sign)`` with uniform signs: each node's
    sign relative to its component multiplies the term's sign, so a term may split in two."""
    out = []
    for nodes, s in roles:
        c, t = comp[nodes], s * sign[nodes]
        for part in (1, -1):
            picked = torch.where(t == part, c, -1)
            if bool((picked >= 0).any()):
                out.append((compact(picked), part))
    return out


def _collisions(a: Tensor, b: Tensor) -> Tensor:
    """The components two maps of one parameter both name at some entry. The maps meet at an
    entry exactly where their coordinates along the dims both vary on (``shared``) agree; their
    broadcast table is compared where it has at most :data:`BROADCAST_FACTOR` times the maps'
    entries, else (a table up to the product of the maps' sizes) the components some
    coordinate along ``shared`` carries in both maps are found on the maps' own entries."""
    shared = [d for d in range(a.dim()) if a.shape[d] > 1 and b.shape[d] > 1]
    if not shared:  # every pair of values meets at some entry
        common = torch.from_numpy(np.intersect1d(a.unique().numpy(), b.unique().numpy()))
        return common[common >= 0]
    if math.prod(torch.broadcast_shapes(a.shape, b.shape)) <= BROADCAST_FACTOR * (
        a.numel() + b.numel()
    ):
        x, y = torch.broadcast_tensors(a, b)
        common = x[x == y].unique()
        return common[common >= 0]
    rows_a, rows_b = _by_coordinate(a, shared), _by_coordinate(b, shared)
    values, rank = torch.cat([rows_a[1], rows_b[1]]).unique(return_inverse=True)
    width = max(len(values), 1)
    keys_a = (rows_a[0] * width + rank[: len(rows_a[1])]).unique()
    keys_b = (rows_b[0] * width + rank[len(rows_a[1]) :]).unique()
    at = torch.searchsorted(keys_a, keys_b).clamp(max=max(len(keys_a) - 1, 0))
    both = keys_b[keys_a[at] == keys_b] if len(keys_a) else keys_b[:0]
    return values[both % width].unique()


def _by_coordinate(m: Tensor, shared: list[int]) -> tuple[Tensor, Tensor]:
    """The entries of a map naming a component, as (flat coordinate along the ``shared`` dims,
    component) pairs: two ``[k]`` int64 tensors, ``k`` at most ``m.numel()``."""
    rest = [d for d in range(m.dim()) if d not in shared]
    flat = m.permute(shared + rest).reshape(math.prod(m.shape[d] for d in shared), -1)
    coordinate, column = torch.nonzero(flat >= 0, as_tuple=True)
    return coordinate, flat[coordinate, column]


# The most entries, per entry of two maps of one parameter, of the table they broadcast to that
# is compared whole when looking for a generator both name at one entry.
BROADCAST_FACTOR = 4
UNBLOCKED = 1 << 40  # the reason index of a component nothing blocks (larger than every real one)
KEY_LIMIT = 1 << 62  # the largest integer key a product of column sizes may reach (int64)


def compile_structure(
    model: nn.Module, ctx: TraceContext, notes: tuple[str, ...] = ()
) -> GaugeStructure:
    """Turn a finished trace into a :class:`GaugeStructure`.

    The nodes' equalities are solved (a signed union-find); a component is a generator when no
    mark fixed it, no cycle of its equalities forces ``h = -h``, no entry would carry it twice
    with one sign (the factor squared), and it both multiplies and divides some parameter
    entries (otherwise ``||theta||^2`` has no minimum along it). Each generator is oriented so
    that the first channel that produces it is multiplied, and generators are numbered by their
    first producing channel in parameter order.
    """
    edges, links = _edge_table(ctx)
    part = _positive_parts(ctx.num_nodes, edges, links)
    comp, sign, conflicted, count = _signed_components(edges, links, part)
    if ctx.slice_links:  # slices picked by rows that depend on the data
        ctx.block_mismatched_gathers(_components_without_slice_links(edges, links, part))
    reason, reasons, group = _blocking_reasons(ctx, comp, conflicted, count, edges)
    names = [n for n, _ in model.named_parameters()]
    producers = [n for n in names if n in ctx.produced]
    oriented = sign * _orientation(ctx, producers, comp, sign, count)[comp]
    resolved: dict[str, list[tuple[Tensor, int]]] = {}
    has_in = torch.zeros(count, dtype=torch.bool)
    has_out = torch.zeros(count, dtype=torch.bool)
    for name in names:
        if ctx.roles.get(name):
            resolved[name] = _resolved_terms(ctx.roles[name], comp, oriented)
            _mark_sides_and_squares(resolved[name], has_in, has_out, reason, len(reasons) - 1)
    valid = (reason == UNBLOCKED) & has_in & has_out
    generator_of = _numbering(ctx, names, producers, comp, resolved, valid, count)
    num = int((generator_of >= 0).sum())
    params = _param_terms(ctx, names, resolved, generator_of)
    layers = [""] * num
    for name in reversed(producers):
        g = generator_of[comp[ctx.produced[name].reshape(-1)]]
        module = module_of(name)
        for n in g[g >= 0].unique().tolist():
            layers[n] = module
    kinds = _kinds(ctx, comp, generator_of, num)
    produced = {name: generator_of[comp[ctx.produced[name].reshape(-1)]] for name in producers}
    sharers = _sharers(ctx, producers, group)
    why = _Why(reason[comp], reasons, group, _mark_keys(ctx, group), sharers)
    exclusions = _exclusions(ctx, producers, comp, valid, why, has_out)
    in_out = _stored_in_out(model) & params.keys()
    types = {name: _class_name(module) for name, module in model.named_modules()}
    return GaugeStructure(
        num,
        params,
        exclusions,
        layers,
        kinds,
        produced,
        names,
        notes,
        in_out,
        _aliases(model),
        types,
        {name: ctx.gain_channels[name] for name in producers if name in ctx.gain_channels},
    )


def _aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Per parameter the model holds under several names, its first name (the one
    ``named_parameters`` gives) to the others."""
    first: dict[int, str] = {}
    other: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), name)
        if key != name:
            other.setdefault(key, []).append(name)
    return {name: tuple(names) for name, names in other.items()}


# Where FSDP2 defines the classes it swaps in for a sharded module's (``FSDPLinear``: a subclass
# of ``FSDPModule`` and ``Linear``), which a structure does not record.
SHARDING_CLASSES = "torch.distributed.fsdp"


def _class_name(module: nn.Module) -> str:
    """The name of ``module``'s class, FSDP2's sharded class looked through (``Linear`` for an
    ``FSDPLinear``): a model sharded since, or before, has the same modules."""
    sharded = (c.__module__.startswith(SHARDING_CLASSES) for c in type(module).__mro__)
    return next(c for c, s in zip(type(module).__mro__, sharded, strict=True) if not s).__name__


def _stored_in_out(model: nn.Module) -> frozenset[str]:
    """The ``weight`` s whose module type stores them ``[in, out]``: Hugging Face's ``Conv1D``
    (by its name: transformers is not imported) and embeddings."""
    return frozenset(
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if type(module).__name__ == "Conv1D" or isinstance(module, nn.Embedding | nn.EmbeddingBag)
    )


def _blocking_reasons(
    ctx: TraceContext, comp: Tensor, conflicted: Tensor, count: int, edges: np.ndarray
) -> tuple[Tensor, list[str], Tensor]:
    """Per component, the index into ``reasons`` of why it is no generator (:data:`UNBLOCKED`:
    nothing blocks it yet); the last reason is the squared factor, which
    :func:`_mark_sides_and_squares` sets."""
    first_mark, reasons, group = _first_reason(ctx, comp, count, edges)
    reason = torch.where(first_mark == len(reasons), UNBLOCKED, first_mark)
    reasons.append("its log-factor would have to equal its own negative")
    reason[conflicted & (reason == UNBLOCKED)] = len(reasons) - 1
    reasons.append("a parameter entry would scale with the square of its factor")
    return reason, reasons, group


def _orientation(
    ctx: TraceContext, producers: list[str], comp: Tensor, sign: Tensor, count: int
) -> Tensor:
    """Per component, ``+1`` or ``-1``: the flip that makes its first producing channel
    multiplied."""
    flip = torch.zeros(count, dtype=torch.long)
    for name in reversed(producers):
        nodes = ctx.produced[name].reshape(-1).flip(0)
        flip[comp[nodes]] = sign[nodes]
    return torch.where(flip == 0, 1, flip)


def _mark_sides_and_squares(
    terms: list[tuple[Tensor, int]], has_in: Tensor, has_out: Tensor, reason: Tensor, square: int
) -> None:
    """Record which components a parameter's terms multiply (``has_in``) and divide
    (``has_out``) at some entry, where a term of the other sign does not cancel them (an entry
    carrying a component once with each sign does not move), and block (reason ``square``)
    those two terms of one sign name at one entry."""
    for i, (c, s) in enumerate(terms):
        moved = c >= 0
        for c2, s2 in terms:
            if s2 != s and _share_components(c, c2):  # else c != c2 wherever c >= 0
                moved = moved & (c != c2)
        (has_in if s > 0 else has_out)[c.expand(moved.shape)[moved]] = True
        for c2, s2 in terms[i + 1 :]:
            if s2 == s and _share_components(c, c2):  # else no entry names one twice
                squared = _collisions(c, c2)
                reason[squared] = torch.clamp(reason[squared], max=square)


def _share_components(c: Tensor, c2: Tensor) -> bool:
    """Whether two terms' component maps (compact, ``-1`` for none) name a component in common:
    only then can an entry carry one component with both signs. Compared on the maps' own
    entries through a table of the components ``c`` names, so that terms along different dims
    are never broadcast to the parameter's shape."""
    a, b = c[c >= 0], c2[c2 >= 0]
    if not len(a) or not len(b):
        return False
    seen = torch.zeros(int(a.max()) + 1, dtype=torch.bool)
    seen[a] = True
    return bool(seen[b[b < len(seen)]].any())


def _numbering(
    ctx: TraceContext,
    names: list[str],
    producers: list[str],
    comp: Tensor,
    resolved: dict[str, list[tuple[Tensor, int]]],
    valid: Tensor,
    count: int,
) -> Tensor:
    """The generator of each component (``[count + 1]``, ``-1``: none; the last is the slot of
    entries with no component): the valid components numbered by their first producing channel
    in parameter order, then by any other entry."""
    produced_comps = [comp[ctx.produced[n].reshape(-1)] for n in producers]
    any_comps = [c.reshape(-1) for n in names for c, _ in resolved.get(n, [])]
    order = torch.cat(produced_comps + any_comps) if any_comps else torch.zeros(0, dtype=torch.long)
    order = order[order >= 0]
    order = order[valid[order]]
    uniq, inverse = torch.unique(order, return_inverse=True)
    first = torch.full((len(uniq),), len(order)).scatter_reduce(
        0, inverse, torch.arange(len(order)), reduce="amin"
    )
    ranked = uniq[torch.argsort(first)]
    generator_of = torch.full((count + 1,), -1)
    generator_of[ranked] = torch.arange(len(ranked))
    return generator_of


def _param_terms(
    ctx: TraceContext,
    names: list[str],
    resolved: dict[str, list[tuple[Tensor, int]]],
    generator_of: Tensor,
) -> dict[str, ParamTerms]:
    """Each parameter some generator acts on, with its terms renumbered to generators
    (multiplying terms first)."""
    params: dict[str, ParamTerms] = {}
    for name in names:
        terms = [(generator_of[c], s) for c, s in resolved.get(name, [])]
        terms = _cancel_opposite(terms)
        terms = [(compact(g), s) for g, s in terms if bool((g >= 0).any())]
        terms.sort(key=lambda term: -term[1])  # multiplying terms first, in a fixed order
        if terms:
            shape = tuple(ctx.params[name].shape)
            params[name] = ParamTerms(name, shape, tuple(Term(g.clone(), s) for g, s in terms))
    return params


class _Why(NamedTuple):
    """What explains an exclusion: per node, the index into ``reasons`` of why its component is
    no generator (:data:`UNBLOCKED`: nothing blocks it), its group (see :func:`_groups`), the
    marks on each group (see :func:`_mark_keys`), and the producing modules of each group (see
    :func:`_sharers`)."""

    reason: Tensor
    reasons: list[str]
    group: Tensor
    marks: Tensor
    sharers: tuple[Tensor, list[str]]


def _sharers(ctx: TraceContext, producers: list[str], group: Tensor) -> tuple[Tensor, list[str]]:
    """The producing modules (in parameter order) and, sorted, ``group * len(modules) +
    module`` for every group and module producing some of its channels."""
    modules = list(dict.fromkeys(module_of(name) for name in producers))
    index = {m: i for i, m in enumerate(modules)}
    keys = [
        group[ctx.produced[n].reshape(-1)] * len(modules) + index[module_of(n)] for n in producers
    ]
    return torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.long), modules


def _shared_with(sharers: tuple[Tensor, list[str]], group: Tensor, own: Tensor) -> Tensor:
    """Per node of ``group`` (its group), ``[k, 2]``: the first module other than its own
    (``own``, ``[k]``: an index into the modules) that produces channels of the group (an index
    into the modules) and how many do."""
    keys, modules = sharers
    width = len(modules)
    lo = _sorted_positions(keys, group * width)
    total = _sorted_positions(keys, (group + 1) * width) - lo
    at = torch.where(keys[lo] % width == own, lo + 1, lo)
    return torch.stack([keys[at.clamp(max=len(keys) - 1)] % width, total - 1], 1)


def _shared_note(modules: list[str], other: int, count: int) -> str:
    """What an exclusion's reason adds when ``count`` other modules, the first ``other``,
    produce channels joined with the excluded ones ("" when none does)."""
    if count == 0:
        return ""
    more = f" and {count - 1} more layer{'s' if count > 2 else ''}" if count > 1 else ""
    return (
        f"; on channels shared with '{modules[other]}'{more} (outputs joined, e.g. by a "
        "residual sum)"
    )


def _exclusions(
    ctx: TraceContext,
    producers: list[str],
    comp: Tensor,
    valid: Tensor,
    why: _Why,
    has_out: Tensor,
) -> list[Exclusion]:
    """The producing channels that are no generators, grouped by module and reason (for gains
    per column or one for the whole weight: the output channels of their layer), and the
    rows of parameters fixed before they produced any channel. A channel blocked by a mark is
    explained by the first mark on its group at or after the op that produced it (the nearest
    op that blocks it), with the other modules producing channels of that group."""
    unblocked = [
        "not consumed by any parameter (its output is unused)",
        "no producing parameter",
    ]
    excluded: dict[tuple[str, str], set[int]] = {}
    node, owner, channel = _bad_channels(ctx, producers, comp, valid)
    explained = _explained(ctx, producers, comp, why, has_out, node, owner)
    for (p, k, other, count), channels in zip(*_row_groups(explained, channel), strict=True):
        text = why.reasons[k] if k < len(why.reasons) else unblocked[k - len(why.reasons)]
        text += _shared_note(why.sharers[1], other, count)
        if producers[p] in ctx.gain_channels:  # gains of one generator: all output channels
            channels = list(range(ctx.gain_channels[producers[p]]))
        excluded.setdefault((module_of(producers[p]), text), set()).update(channels)
    for name, reason in ctx.fixed.items():  # fixed before producing a channel: its rows
        if name not in ctx.produced:
            rows = ctx.params[name].shape[0] if ctx.params[name].dim() else 1
            excluded.setdefault((module_of(name), reason), set()).update(range(rows))
    return [Exclusion(m, r, tuple(sorted(ch))) for (m, r), ch in excluded.items()]


def _bad_channels(
    ctx: TraceContext, producers: list[str], comp: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Every producing channel that is no generator, producer after producer (``[k]`` each):
    its node, its producer (an index into ``producers``) and its index among that producer's
    channels."""
    if not producers:
        return (torch.zeros(0, dtype=torch.long),) * 3
    nodes = torch.cat([ctx.produced[name].reshape(-1) for name in producers])
    sizes = torch.tensor([ctx.produced[name].numel() for name in producers])
    owner = torch.repeat_interleave(torch.arange(len(producers)), sizes)
    channel = torch.arange(len(nodes)) - (torch.cumsum(sizes, 0) - sizes)[owner]
    bad = ~valid[comp[nodes]]
    return nodes[bad], owner[bad], channel[bad]


def _explained(
    ctx: TraceContext,
    producers: list[str],
    comp: Tensor,
    why: _Why,
    has_out: Tensor,
    node: Tensor,
    owner: Tensor,
) -> Tensor:
    """``[k, 4]``: per excluded channel (its ``node`` and ``owner``, an index into
    ``producers``), its producer, its reason (an index into ``why.reasons``, then the unused
    output and the missing producer; a mark: the nearest one at or after its producer's op),
    the first other module producing channels of its group and how many do."""
    width = len(ctx.marks) + 1
    start = torch.tensor([ctx.produced_at.get(name, 0) for name in producers], dtype=torch.long)
    index = {m: i for i, m in enumerate(why.sharers[1])}
    own = torch.tensor([index[module_of(name)] for name in producers], dtype=torch.long)
    group, r = why.group[node], why.reason[node]
    r = torch.where(r < width, _nearest_marks(why.marks, width, group, start[owner]), r)
    r = torch.where(r != UNBLOCKED, r, len(why.reasons) + has_out[comp[node]].long())
    shared = _shared_with(why.sharers, group, own[owner])
    return torch.cat([owner[:, None], r[:, None], shared], 1)


def _row_groups(rows: Tensor, values: Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """The distinct rows of ``rows`` (``[k, c]``, integers ``>= 0``) in the order of their
    first occurrence and, for each, the ``values`` (``[k]``) at the rows equal to it, in row
    order."""
    if not len(rows):
        return [], []
    ids, span = torch.zeros(len(rows), dtype=torch.long), 1  # equal where the rows agree so far
    for column in rows.T:
        size = int(column.max()) + 1
        if span * size > KEY_LIMIT:  # renumber both densely (below len(rows)): no overflow
            ids, column = (torch.unique(t, return_inverse=True)[1] for t in (ids, column))
            span, size = len(rows), len(rows)
        ids, span = ids * size + column, span * size
    _, ids, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    order = torch.argsort(ids, stable=True)  # by row, then by position
    first = order[counts.cumsum(0) - counts]
    ranked = torch.argsort(first).tolist()  # the distinct rows by first occurrence
    flat, bounds = values[order].tolist(), [0, *counts.cumsum(0).tolist()]
    return rows[first[ranked]].tolist(), [flat[bounds[g] : bounds[g + 1]] for g in ranked]


def _sorted_positions(keys: Tensor, values: Tensor) -> Tensor:
    """Per value (``[k]``), the number of the sorted ``keys`` below it (``torch.searchsorted``,
    through NumPy's, which is faster on the CPU)."""
    return torch.from_numpy(np.searchsorted(keys.numpy(), values.numpy()))


def _cancel_opposite(terms: list[tuple[Tensor, int]]) -> list[tuple[Tensor, int]]:
    """Where two terms of opposite signs name the same generator at one entry (a layer applied
    to its own output), the entry is invariant under it: both terms drop it there."""
    terms = list(terms)
    for i in range(len(terms)):
        for j in range(i + 1, len(terms)):
            (a, sa), (b, sb) = terms[i], terms[j]
            if sa == sb or not _share_components(a, b) or not _collisions(a, b).numel():
                continue
            x, y = torch.broadcast_tensors(a, b)
            same = (x == y) & (x >= 0)
            terms[i] = (torch.where(same, -1, x), sa)
            terms[j] = (torch.where(same, -1, y), sb)
    return terms


def _kinds(ctx: TraceContext, comp: Tensor, generator_of: Tensor, num: int) -> list[str]:
    """The kind of each generator: the most specific tag any of its nodes carries. A rotary
    pair is a query-key generator spanning dims a rearrangement united (``rotate_half``): a
    union of channels with a permutation of themselves elsewhere (``h + h.flip(1)`` in a CNN)
    is not one."""
    tagged = torch.zeros(num + 1, len(KINDS), dtype=torch.bool)
    tagged[:, KINDS.index("neuron")] = True
    for nodes, kind in ctx.tags:
        g = generator_of[comp[nodes]]
        tagged[torch.where(g < 0, num, g), KINDS.index(kind)] = True
    tagged[:, KINDS.index("rotary pair")] &= tagged[:, KINDS.index("query-key")]
    rank = tagged.to(torch.uint8).argmax(1)  # the first kind tagged
    return [KINDS[r] for r in rank[:num].tolist()]
