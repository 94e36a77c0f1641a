"""Hard gauge fixing of saved weights (``gaugefix balance``).

A checkpoint is a flat state dict, read from safetensors or from a PyTorch file (loaded with
``weights_only=True``), or from the shards a sharded checkpoint's index names.
:func:`balance_state_dict` balances it in float64 on a model built by the caller and returns the
balanced tensors in the file's dtypes, together with what an output check on an example input
measured; :func:`write_state_dict` writes them in the file's format (and layout of shards).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import itertools
import json
import math
import pickle
import re
import struct
import sys
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

import gaugefix
from gaugefix.action import all_finite
from gaugefix.balancing import BalanceResult
from gaugefix.distributed import ShardingError, refuse_sharded, uses_fully_shard
from gaugefix.equalize import EqualizeResult, objective_name
from gaugefix.errors import GaugefixError, first_line
from gaugefix.files import output_target, write_all, write_bytes
from gaugefix.precision import float64_copy, float64_outputs, relative_changes

__all__ = [
    "balance_state_dict",
    "CheckpointBalance",
    "CheckpointError",
    "check_output",
    "read_state_dict",
    "ShardIndex",
    "StateDictFile",
    "write_state_dict",
]

Format = Literal["safetensors", "torch"]


class CheckpointError(GaugefixError, ValueError):
    """A weights file, or weights for a model, that cannot be balanced; the message says why."""


@dataclasses.dataclass
class StateDictFile:
    """A state dict as read from a file: ``tensors`` (name -> tensor), the file ``format``,
    safetensors' ``__metadata__`` strings and a PyTorch state dict's ``_metadata`` (module
    versions), both written back unchanged."""

    tensors: dict[str, Tensor]
    format: Format
    metadata: Any = None
    index: ShardIndex | None = None


@dataclasses.dataclass
class ShardIndex:
    """The index of a sharded checkpoint: its file's bytes ``text`` (written back unchanged),
    its ``weight_map`` (tensor name -> shard file name, a file in the index's directory), and
    for each shard file (in the order of first mention) the names it holds, in its order, and
    its metadata (as :class:`StateDictFile`'s)."""

    text: bytes
    weight_map: dict[str, str]
    names: dict[str, list[str]]
    metadata: dict[str, Any]


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 8 + size <= path.stat().st_size


def read_state_dict(path: str | Path) -> StateDictFile:
    """The state dict in ``path``: a safetensors file, a PyTorch file holding a mapping of
    names to tensors (loaded with ``weights_only=True``, so no code in it runs), or the index
    of a sharded checkpoint, a JSON file whose ``weight_map`` names the shard file of each
    tensor (:func:`_read_sharded`: every shard's tensors, in one state dict)."""
    path = Path(path)
    _check_file(path)
    index = None if _is_safetensors(path) else _json_index(path)
    if index is not None:
        return _read_sharded(path, *index)
    return _read_file(path)


WEIGHTS_SUFFIXES = (
    ".safetensors.index.json",
    ".bin.index.json",
    ".safetensors",
    ".pt",
    ".pth",
    ".bin",
)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"no weights file {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is not a regular file (a directory): {_files_in(path)}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a directory, device or FIFO)")


def _files_in(directory: Path) -> str:
    """What to give instead of ``directory`` (a ``save_pretrained`` folder, say): the weights
    files in it, or a sharded checkpoint's index alone when it holds one."""
    try:
        found = sorted(f for f in directory.iterdir() if f.name.endswith(WEIGHTS_SUFFIXES))
    except OSError:  # a directory that cannot be listed
        found = []
    indexes = [f for f in found if f.name.endswith(".index.json")]
    found = indexes or found
    if not found:
        return f"give a weights file ({', '.join(WEIGHTS_SUFFIXES)}); none is in it"
    named = ", ".join(str(f) for f in found[:3]) + (" ..." if len(found) > 3 else "")
    return f"give the weights file in it: {named}"


def _read_file(path: Path) -> StateDictFile:
    """The state dict of the safetensors or PyTorch file ``path`` (a regular file)."""
    try:
        if _is_safetensors(path):
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, "pt") as f:
                metadata = f.metadata()
            return StateDictFile(load_file(path), "safetensors", metadata)
        if _json_index(path) is not None:
            raise CheckpointError(f"{path} is the index of a sharded checkpoint, not a shard")
        if path.name.endswith(".safetensors"):  # torch.load would read it with safetensors
            raise CheckpointError(_misnamed(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"cannot read {path} as safetensors or a PyTorch file: {_load_failure(err)}"
        ) from None
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path} holds {_a(loaded)}, not a state dict (names -> tensors)")
    for k, v in loaded.items():
        if not (isinstance(k, str) and isinstance(v, Tensor)):
            raise CheckpointError(_not_flat(path, loaded, k))
    return StateDictFile(dict(loaded), "torch", getattr(loaded, "_metadata", None))


# The first bytes of a file torch.save writes: a zip archive, or a pickle (protocol 2 or later).
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _misnamed(path: Path) -> str:
    """Why ``path``, named ``.safetensors``, is refused: it is not a safetensors file (an
    8-byte little-endian header length, then that many bytes of JSON), and what it is."""
    with open(path, "rb") as f:
        head = f.read(4)
    what = f"{path} is named .safetensors but is not a safetensors file (an 8-byte header length"
    what += ", then a JSON header)"
    if head.startswith(TORCH_MAGIC):
        return what + ": it is a PyTorch file (torch.save); name it .pt or .bin, and pass that"
    return what


# The largest file read as JSON to tell a sharded checkpoint's index from a weights file.
INDEX_MAX_BYTES = 64 * 2**20


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members; :class:`CheckpointError` for a name given twice (JSON keeps
    the last, so an index would name one shard of a tensor listed in two)."""
    counts = Counter(k for k, _ in pairs)
    twice = sorted(k for k, n in counts.items() if n > 1)
    if twice:
        raise CheckpointError(f"the index lists {_listed(twice)} twice")
    return dict(pairs)


def _json_index(path: Path) -> tuple[bytes, dict[str, Any]] | None:
    """The bytes and the members of ``path`` when it is the index of a sharded checkpoint (a
    JSON object whose ``weight_map`` is an object); None for a file that is not JSON (a
    PyTorch file is a zip archive or a pickle, never JSON); :class:`CheckpointError` for
    another JSON file, such as a model's configuration, and for a name the index gives twice."""
    if path.stat().st_size > INDEX_MAX_BYTES:
        return None
    with open(path, "rb") as f:
        text = f.read()
    if text[:1] != b"{":
        return None
    try:
        loaded = json.loads(text, object_pairs_hook=_unique_keys)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except ValueError:  # not JSON (nor UTF-8): left to torch.load
        return None
    if isinstance(loaded, dict) and isinstance(loaded.get("weight_map"), dict):
        return text, loaded
    raise CheckpointError(f"{path} is a JSON file, not weights (safetensors or a PyTorch file)")


# A shard's format as its file name says it (the other names: read to tell).
SHARD_SUFFIXES: dict[str, Format] = {".safetensors": "safetensors", ".bin": "torch", ".pt": "torch"}
INDEX_SUFFIXES: dict[str, Format] = {
    ".safetensors.index.json": "safetensors",
    ".bin.index.json": "torch",
    ".pt.index.json": "torch",
}


def _shard_files(path: Path, weight_map: dict) -> list[str]:
    """The shard files ``weight_map`` names (each once, in order); :class:`CheckpointError`
    for an empty map, a name or shard that is not a string, a shard that is not a file name in
    the index's directory, or one that is missing."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: its weight_map must map tensor names to shard file names")
    files = list(dict.fromkeys(weight_map.values()))
    if not files:
        raise CheckpointError(f"{path}: its weight_map is empty (no tensor, no shard)")
    odd = [f for f in files if Path(f).name != f or f in ("", ".", "..")]
    if odd:
        raise CheckpointError(
            f"{path}: its weight_map names {_listed(odd)}, not a file name in its directory"
        )
    missing = [f for f in files if not (path.parent / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: its weight_map names {_listed(missing)}, missing from {path.parent}"
        )
    return files


def _claimed_format(path: Path, files: list[str]) -> Format | None:
    """The format the index's name and its shards' names give (None when none does);
    :class:`CheckpointError` when they give two (mixed formats)."""
    said = {fmt for end, fmt in INDEX_SUFFIXES.items() if path.name.endswith(end)}
    said |= {SHARD_SUFFIXES[Path(f).suffix] for f in files if Path(f).suffix in SHARD_SUFFIXES}
    if len(said) > 1:
        raise CheckpointError(
            f"{path}: its name and its shards' names mix the safetensors and torch formats"
        )
    return next(iter(said), None)


def _read_sharded(path: Path, text: bytes, index: dict[str, Any]) -> StateDictFile:
    """The sharded checkpoint whose index is ``path`` (``text``, holding ``index``): each
    shard read as one file, the tensors joined in one state dict, and how to write them back
    (:class:`ShardIndex`). :class:`CheckpointError` for a shard that is missing, not of the
    format the names say (or of another format than the others), a tensor in two shards, in a
    shard the ``weight_map`` does not name for it, or missing from its shard."""
    weight_map = index["weight_map"]
    files = _shard_files(path, weight_map)
    claimed = _claimed_format(path, files)
    formats = {f: "safetensors" if _is_safetensors(path.parent / f) else "torch" for f in files}
    expected = claimed or formats[files[0]]
    for f, fmt in formats.items():
        if fmt != expected:  # told by its first bytes, before any shard is loaded
            said = "as the names say" if claimed else f"as {files[0]} is (mixed formats)"
            raise CheckpointError(f"{path}: its shard {f} is a {fmt} file, not {expected} {said}")
    shards = {f: _read_file(path.parent / f) for f in files}
    tensors: dict[str, Tensor] = {}
    for f, shard in shards.items():
        for name, t in shard.tensors.items():
            _check_listed(path, name, f, weight_map, tensors, shards)
            tensors[name] = t
    absent = [name for name in weight_map if name not in tensors]
    if absent:
        raise CheckpointError(
            f"{path}: {_listed(absent)} not in the shard its weight_map names "
            f"({weight_map[absent[0]]})"
        )
    names = {f: list(shard.tensors) for f, shard in shards.items()}
    metadata = {f: shard.metadata for f, shard in shards.items()}
    index_of = ShardIndex(text, dict(weight_map), names, metadata)
    return StateDictFile(tensors, shards[files[0]].format, None, index_of)


def _check_listed(
    path: Path, name: str, shard: str, weight_map: dict, seen: dict, shards: dict
) -> None:
    """:class:`CheckpointError` unless the tensor ``name`` found in ``shard`` is in no
    shard read before (``seen``) and is the one the ``weight_map`` names for it."""
    if name in seen:
        before = next(f for f, s in shards.items() if name in s.tensors)
        raise CheckpointError(f"{path}: {name} is in two shards, {before} and {shard}")
    if name not in weight_map:
        raise CheckpointError(f"{path}: {name} is in {shard} but not in its weight_map")
    if weight_map[name] != shard:
        raise CheckpointError(
            f"{path}: {name} is in {shard}, but its weight_map names {weight_map[name]}"
        )


def _load_failure(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line: for an object other than
    tensors in the pickle (a whole model saved with ``torch.save(model)``), the object it
    refused and what to save instead, not torch's advice to load it with ``weights_only=False``
    (which runs the file's code, and which this command never does)."""
    if isinstance(err, KeyError) and err.args and isinstance(err.args[0], int):
        # the weights-only unpickler's opcode (a byte) that no pickle has
        return f"neither a zip archive nor a pickle of torch.save (unknown opcode {err})"
    if not isinstance(err, pickle.UnpicklingError) or "weights_only" not in str(err):
        return first_line(err)
    found = re.search(r"WeightsUnpickler error: (.*?)(?:\.(?: |$)|$)", str(err), re.MULTILINE)
    refused = found.group(1) if found else "an object weights_only=True does not load"
    return (
        f"it holds objects other than tensors ({refused}), and a file is loaded with "
        "weights_only=True, so no code in it runs: save the model's state dict, "
        "torch.save(model.state_dict(), 'weights.pt'), and pass that"
    )


def _a(value: object) -> str:
    """The type of ``value`` with its article: ``an int``, ``a dict``."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _not_flat(path: Path, loaded: Mapping, key: object) -> str:
    """Why ``loaded`` (from ``path``) is not a state dict: its entry ``key``; for a training
    checkpoint (entries that are state dicts, as Lightning's ``state_dict`` or a ``{"model":
    ..., "optimizer": ...}`` dict), which entries hold tensors by name and how to extract one."""
    what = f"{path} holds {_a(loaded)}, not a state dict (names -> tensors): its "
    if not isinstance(key, str):
        return what + f"key {key!r} is {_a(key)}, not a name"
    what += f"entry {key!r} is {_a(loaded[key])}, not a tensor"
    inner = {
        k: v
        for k, v in loaded.items()
        if isinstance(v, Mapping) and v and all(isinstance(t, Tensor) for t in v.values())
    }
    if not inner:
        return what
    found = ", ".join(f"{k!r} ({len(v)} tensors{_prefix(v)})" for k, v in inner.items())
    return (
        f"{what}; it looks like a training checkpoint, with tensors by name in {found}: save the "
        f"model's state dict alone, torch.save(torch.load({str(path)!r}, weights_only=True)[KEY], "
        "'weights.pt') with KEY the entry that holds the model's weights, and pass that file"
        + (
            " (strip the prefix if the model's names have none)"
            if any(map(_prefix, inner.values()))
            else ""
        )
    )


def _prefix(state: Mapping) -> str:
    """``, every name starting with 'model.'`` when all names of ``state`` start with one
    prefix ending in a dot, as a wrapper's (a LightningModule's attribute) do."""
    first = {str(n).split(".", 1)[0] for n in state}
    if len(first) != 1 or not all("." in str(n) for n in state):
        return ""
    return f", every name starting with {next(iter(first)) + '.'!r}"


def write_state_dict(state: StateDictFile, path: str | Path) -> None:
    """Write ``state`` to ``path`` in its format, every name it holds: serialised in memory,
    then written with :func:`gaugefix.files.write_bytes`, so ``path`` (or the file a symbolic
    link there points to) is either untouched or complete, and a new file gets the permissions
    the umask gives; :class:`~gaugefix.files.OutputError` (naming ``path``) when it cannot be
    written. Tensors sharing memory (tied weights, views) stay one storage in a PyTorch file;
    in a safetensors file, which holds no shared or strided tensors, each name gets a contiguous
    copy of its values. :class:`CheckpointError` (nothing written) for what the format cannot
    hold (:func:`_check_writable`). A sharded ``state`` (its ``index`` set) is written as
    :func:`_write_sharded` writes it."""
    if state.index is not None:
        _write_sharded(state, Path(path))
        return
    _check_writable(state)
    write_bytes(path, _serialised(state))


def _serialised(state: StateDictFile) -> bytes:
    """The bytes of the file holding ``state`` (a state dict its format holds)."""
    if state.format == "safetensors":
        from safetensors.torch import save

        return save(_unshared(state.tensors), metadata=state.metadata)
    out: OrderedDict[str, Tensor] = OrderedDict(state.tensors)
    if state.metadata is not None:
        out._metadata = state.metadata  # type: ignore[attr-defined]
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


def _write_sharded(state: StateDictFile, path: Path) -> None:
    """Write the sharded ``state``: its index, unchanged, to ``path``, and beside it each shard
    file the index names, holding the tensors the ``weight_map`` puts there (in the order they
    were read) and the shard's metadata; all or nothing (:func:`gaugefix.files.write_all`: each
    file to a temporary one, all renamed once every one is complete). :class:`CheckpointError`
    (nothing written) when the tensors are not the ``weight_map``'s names, or for what the
    format cannot hold."""
    index = state.index
    assert index is not None
    if set(state.tensors) != set(index.weight_map):
        odd = sorted(set(state.tensors) ^ set(index.weight_map))
        raise CheckpointError(f"the tensors are not those of the index: {_listed(odd)}")
    shards = [
        StateDictFile(
            {name: state.tensors[name] for name in names}, state.format, index.metadata[f]
        )
        for f, names in index.names.items()
    ]
    for shard in shards:
        _check_writable(shard)
    check_output(state, path)
    if state.format == "torch":
        shards = _own_storages(shards)
    files = [
        (path.parent / f, functools.partial(_serialised, shard))
        for f, shard in zip(index.names, shards, strict=True)
    ]
    write_all([*files, (path, lambda: index.text)])


def _own_storages(shards: list[StateDictFile]) -> list[StateDictFile]:
    """The PyTorch ``shards`` with each tensor whose storage a tensor of another shard uses
    replaced by a contiguous copy: ``torch.save`` writes a tensor's whole storage, so each
    shard would hold the others' entries too (views of one tensor, such as experts split from
    a merged one). Tensors sharing a storage within one shard only stay shared."""
    owners: defaultdict[tuple, set[int]] = defaultdict(set)
    for i, shard in enumerate(shards):
        for t in shard.tensors.values():
            if t.numel():
                owners[(t.device, t.untyped_storage().data_ptr())].add(i)

    def own(t: Tensor) -> Tensor:
        if not t.numel() or len(owners[(t.device, t.untyped_storage().data_ptr())]) == 1:
            return t
        return t.clone(memory_format=torch.contiguous_format)

    return [
        dataclasses.replace(s, tensors={n: own(t) for n, t in s.tensors.items()}) for s in shards
    ]


def _named_shards(index: Path) -> set[str]:
    """The shard files the index ``index`` names; none for a file that is no index."""
    try:
        found = _json_index(index) if index.is_file() else None
    except (CheckpointError, OSError):
        return set()
    return {f for f in found[1]["weight_map"].values() if isinstance(f, str)} if found else set()


def _same(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file (both exist)."""
    return a.exists() and b.exists() and a.samefile(b)


def check_output(state: StateDictFile, path: str | Path) -> None:
    """:class:`CheckpointError` when writing the sharded ``state`` to the index ``path`` would
    replace a file that is not part of the checkpoint there: a shard file beside ``path``
    that the index now at ``path`` does not name (another model's file, or the shards of
    another index when ``path`` is a new index beside them), or that another index
    (``*.index.json``) of that directory names with a file not written (it would name a
    balanced shard among unbalanced ones). Nothing for a state that is not sharded."""
    if state.index is None:
        return
    path = Path(path)
    beside = [path.parent / f for f in state.index.names]
    if output_target(path) in map(output_target, beside):
        raise CheckpointError(f"cannot write {path}: it is also another of the files written")
    there = [p for p in beside if p.exists() or p.is_symlink()]
    if not there:
        return
    own = _named_shards(path)
    foreign = [p for p in there if p.name not in own]
    if foreign:
        at = f"the index {path} does not name it" if own else f"{path} is no index naming it"
        raise CheckpointError(
            f"cannot write {foreign[0]}: a file of that name is there and {at} (it is not a "
            "shard of the checkpoint written over); remove it, or write to another directory"
        )
    for other in sorted(path.parent.glob("*.index.json")):
        named = _named_shards(other)
        shared = [p for p in there if p.name in named]
        if shared and named - set(state.index.names) and not _same(other, path):
            raise CheckpointError(
                f"cannot write {shared[0]}: the index {other} names it too, and would name "
                "a balanced shard among unbalanced ones; write to another directory"
            )


def _check_writable(state: StateDictFile) -> None:
    """:class:`CheckpointError` unless ``state`` is a state dict its format holds: names that are
    strings, tensors with data (not meta); for safetensors, dense tensors of a dtype it stores
    and metadata mapping strings to strings."""
    if state.format not in ("safetensors", "torch"):
        raise CheckpointError(f"unknown format {state.format!r}: 'safetensors' or 'torch'")
    for name, t in state.tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(f"cannot write the name {name!r}: it is {_a(name)}, not a str")
        if not isinstance(t, Tensor):
            raise CheckpointError(f"cannot write {name}: it is {_a(t)}, not a tensor")
        if t.is_meta:
            raise CheckpointError(f"cannot write {name}: a meta tensor holds no values")
    if state.format == "safetensors":
        _check_safetensors(state)


def _check_safetensors(state: StateDictFile) -> None:
    """:class:`CheckpointError` for a tensor or metadata a safetensors file cannot hold."""
    from safetensors.torch import save

    meta = state.metadata
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for kv in meta.items() for v in kv)
    ):
        raise CheckpointError("safetensors metadata must map strings to strings")
    for name, t in state.tensors.items():
        if t.layout != torch.strided:
            raise CheckpointError(f"cannot write {name} as safetensors: a {t.layout} tensor")
    for dtype in {t.dtype for t in state.tensors.values()}:
        try:
            save({"probe": torch.empty(0, dtype=dtype)})
        except Exception:  # safetensors' KeyError or error for a dtype it has no code for
            raise CheckpointError(f"safetensors cannot hold {dtype} tensors") from None


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with each one that shares its storage with another, or is not contiguous,
    replaced by a contiguous copy (safetensors refuses both)."""
    users: defaultdict[tuple, int] = defaultdict(int)
    for t in tensors.values():
        if t.numel():
            users[(t.device, t.untyped_storage().data_ptr())] += 1

    def alone(t: Tensor) -> bool:
        return not t.numel() or users[(t.device, t.untyped_storage().data_ptr())] == 1

    return {
        name: t
        if alone(t) and t.is_contiguous()
        else t.clone(memory_format=torch.contiguous_format)
        for name, t in tensors.items()
    }


@dataclasses.dataclass(frozen=True)
class CheckpointBalance:
    """What :func:`balance_state_dict` measured, on the example input ``x``.

    ``before`` and ``after``: :func:`gaugefix.imbalance_stats` of the given weights and of the
    returned ones; ``result``: what :func:`gaugefix.balance_` (or :func:`gaugefix.equalize_`)
    did in float64; ``output_scale``: ``max |f(x)|`` over the floating outputs with the given
    weights; ``exact_change``: ``max |f_b(x) - f(x)|`` with the balanced float64 weights;
    ``output_change``: the same with the returned weights (rounded to the file's dtypes);
    ``dtype``: the coarsest dtype of a tensor that balancing moved (in float64, whether or not
    its rounding gave back the file's values; ``float64`` when none moved);
    ``per_output_exact`` and ``per_output_change``: for each floating output tensor ``f_i`` (in
    the order of the forward's output), ``max |f_b,i(x) - f_i(x)| / max |f_i(x)|`` with the
    float64 and with the returned weights (``inf`` for a change of an output that is all zero).
    ``check_shapes``: the shapes of the check inputs ``c_k`` (other sizes than ``x``'s, on which
    the structure discovered on ``x`` may not hold); ``per_check_exact`` and
    ``per_check_change``: for each check input, the per-output relative changes as above on
    ``c_k`` (each output against its own ``max |f_i(c_k)|``), with the float64 and with the
    returned weights.
    """

    num_generators: int
    before: dict[str, float]
    after: dict[str, float]
    result: BalanceResult | EqualizeResult
    output_scale: float
    exact_change: float
    output_change: float
    dtype: torch.dtype
    per_output_exact: tuple[float, ...]
    per_output_change: tuple[float, ...]
    check_shapes: tuple[tuple[int, ...], ...] = ()
    per_check_exact: tuple[tuple[float, ...], ...] = ()
    per_check_change: tuple[tuple[float, ...], ...] = ()

    @staticmethod
    def relative_tolerance(dtype: torch.dtype) -> float:
        """``sqrt(eps)`` of ``dtype``: each output must keep half its significant digits."""
        return math.sqrt(torch.finfo(dtype).eps)

    @staticmethod
    def worst(changes: tuple[float, ...]) -> tuple[int, float]:
        """The output whose relative change is the largest (a NaN one first), and that change."""
        return max(enumerate(changes), key=lambda c: (math.isnan(c[1]), c[1]), default=(0, 0.0))

    @property
    def exact_relative(self) -> float:
        """The largest of ``per_output_exact``."""
        return self.worst(self.per_output_exact)[1]

    @property
    def output_relative(self) -> float:
        """The largest of ``per_output_change``."""
        return self.worst(self.per_output_change)[1]

    @property
    def check_exact_relative(self) -> float:
        """The largest of ``per_check_exact`` over every check input (0 without one)."""
        return self.worst(tuple(self.worst(c)[1] for c in self.per_check_exact))[1]

    @property
    def check_relative(self) -> float:
        """The largest of ``per_check_change`` over every check input (0 without one)."""
        return self.worst(tuple(self.worst(c)[1] for c in self.per_check_change))[1]

    @property
    def kept_in_float64(self) -> bool:
        """Balancing in float64 kept each output to ``sqrt(eps_float64)`` of its largest entry,
        on the example input and on each check input."""
        tolerance = self.relative_tolerance(torch.float64)
        return self.exact_relative <= tolerance and self.check_exact_relative <= tolerance

    @property
    def within_tolerance(self) -> bool:
        """The returned weights keep each output to ``sqrt(eps_dtype)`` of its largest entry,
        on the example input and on each check input."""
        tolerance = self.relative_tolerance(self.dtype)
        return (
            self.kept_in_float64
            and self.output_relative <= tolerance
            and self.check_relative <= tolerance
        )


def _storage_key(t: Tensor) -> tuple:
    """What tensors sharing one storage (tied) have in common; a tensor without entries shares
    nothing (empty storages all have address 0)."""
    if t.numel() == 0:
        return ("empty", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


# More than this fraction of a file's names not in the model (or of the model's missing from
# the file): the file is likely another model's.
FOREIGN_FRACTION = 0.5
# The floating dtypes a weights file may hold: float8's have no isfinite, and rounding to them
# would keep no digit of the function.
BALANCED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _refuse_unsupported(model_state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """:class:`CheckpointError` for an entry of the model's state dict that is not a tensor
    (extra state) or is on the meta device, and for a tensor of ``tensors`` that is not dense,
    has no data (meta) or is floating of a dtype not in :data:`BALANCED_DTYPES`."""
    for name, t in model_state.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(
                f"the model's state dict holds {name!r}, a {type(t).__name__}, not a tensor "
                "(extra state): such a model cannot be balanced"
            )
        if t.is_meta:
            raise CheckpointError(
                f"the model's {name} is on the meta device: its factory must allocate it"
            )
    for name, t in tensors.items():
        if t.layout != torch.strided:
            raise CheckpointError(f"{name} is a {t.layout} tensor: only dense ones can be balanced")
        if t.is_meta:
            raise CheckpointError(f"{name} is a meta tensor: it holds no values to balance")
        if t.is_floating_point() and t.dtype not in BALANCED_DTYPES:
            raise CheckpointError(
                f"{name} is {t.dtype}: only float64, float32, float16 and bfloat16 weights can "
                "be balanced"
            )


def _check_fits(name: str, value: Tensor, t: Tensor) -> None:
    """:class:`CheckpointError` unless the file's tensor ``value`` (named ``name``) has the
    shape and kind (floating or not) of the model's ``t``, and finite entries."""
    if tuple(value.shape) != tuple(t.shape):
        raise CheckpointError(
            f"the weights do not fit the model: {name} has shape {tuple(value.shape)}, the "
            f"model's {tuple(t.shape)}"
        )
    if value.is_floating_point() != t.is_floating_point():
        kind = "a floating-point tensor" if t.is_floating_point() else t.dtype
        raise CheckpointError(
            f"the weights do not fit the model: {name} is {value.dtype} where the model has {kind}"
        )
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise CheckpointError(f"{name} holds {bad} non-finite entries (NaN or inf)")


def _tied(model_state: Mapping[str, Tensor]) -> dict[tuple, list[str]]:
    """The names of ``model_state`` by the storage they share (one list per tensor)."""
    tied: dict[tuple, list[str]] = defaultdict(list)
    for name, t in model_state.items():
        tied[_storage_key(t)].append(name)
    return tied


def _refuse_foreign(
    model_state: Mapping[str, Tensor],
    tensors: Mapping[str, Tensor],
    tied: dict[tuple, list[str]] | None = None,
) -> tuple[list[str], list[str]]:
    """The names of ``tensors`` not in ``model_state`` (sorted), and the model's names that
    ``tensors`` lacks (one a name it ties to another stands for; ``tied``: the model's
    :func:`_tied`, when the caller has it). :class:`CheckpointError` saying the file may hold
    another model's weights when most of either are so: more than :data:`FOREIGN_FRACTION` of
    the file's names (none: an empty file is not another model's), or of the model's."""
    tied = _tied(model_state) if tied is None else tied
    unexpected = sorted(set(tensors) - set(model_state))
    missing = [
        name
        for name, t in model_state.items()
        if not any(alias in tensors for alias in tied[_storage_key(t)])
    ]
    if tensors and (
        len(unexpected) > FOREIGN_FRACTION * len(tensors)
        or len(missing) > FOREIGN_FRACTION * len(model_state)
    ):
        raise CheckpointError(
            "the weights do not fit the model, and the file may hold another model's weights: "
            f"{len(unexpected)} of its {len(tensors)} names are not in the model"
            + (f" ({_listed(unexpected)})" if unexpected else "")
            + f", and {len(missing)} of the model's {len(model_state)} are missing from it"
            + (f" ({_listed(missing)})" if missing else "")
        )
    return unexpected, missing


def _complete(model_state: dict[str, Tensor], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` checked against the model's state dict: the same names (a name the model ties
    to another, sharing its storage, may be left out, as safetensors files do), shapes, kinds
    (floating or not), dtypes of :data:`BALANCED_DTYPES` and finite values; most names amiss
    is another model's file (:func:`_refuse_foreign`). Returns them with the tied names filled
    in."""
    _refuse_unsupported(model_state, tensors)
    tied = _tied(model_state)
    unexpected, missing = _refuse_foreign(model_state, tensors, tied)
    for what, names in (("not in the model", unexpected), ("missing", missing)):
        if names:
            raise CheckpointError(f"the weights do not fit the model: {_listed(names)} {what}")
    full = {}
    for name, t in model_state.items():
        present = [alias for alias in tied[_storage_key(t)] if alias in tensors]
        value = tensors[present[0]]
        _check_fits(present[0], value, t)
        if any(not torch.equal(tensors[a], value) for a in present[1:]):
            raise CheckpointError(
                f"{present[0]} and {present[1]} differ, but the model ties them (one tensor)"
            )
        full[name] = value
    _check_views(model_state, full)
    return full


def _listed(names: list[str]) -> str:
    """The first three of ``names``, and how many more there are."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes of its storage that ``t``'s entries lie in: ``[first, last + 1)``."""
    start = t.storage_offset() * t.element_size()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + extent * t.element_size()


def _check_views(model_state: dict[str, Tensor], tensors: dict[str, Tensor]) -> None:
    """:class:`CheckpointError` unless ``tensors`` (one for each name of the model's state
    dict) load into the model as they are, where it keeps entries in one memory in different
    shapes (a buffer viewing a weight reshaped, transposed or sliced): ``load_state_dict``
    copies them in turn, so a later one overwrites where they overlap."""
    memories: dict[tuple, list[str]] = defaultdict(list)
    for name, t in model_state.items():
        if t.numel():
            memories[(t.device, t.untyped_storage().data_ptr())].append(name)
    for names in memories.values():
        if len({_storage_key(model_state[n]) for n in names}) > 1:
            _check_loaded(model_state, tensors, names)


def _check_loaded(model_state: dict[str, Tensor], tensors: dict[str, Tensor], names: list) -> None:
    """Load ``tensors[names]`` into a copy of the memory the model's entries ``names`` share,
    in the model's order; :class:`CheckpointError` naming an entry a later one changed."""
    memory = model_state[names[0]].untyped_storage().clone()
    loaded = {}
    for name in names:
        t = model_state[name]
        view = torch.empty(0, dtype=t.dtype, device=t.device)
        loaded[name] = view.set_(memory, t.storage_offset(), t.shape, t.stride())
        loaded[name].copy_(tensors[name])
    for i, name in enumerate(names):
        if not torch.equal(loaded[name], tensors[name].to(loaded[name].dtype)):
            first, end = _span(model_state[name])
            later = next(
                n
                for n in names[i + 1 :]
                if _span(model_state[n])[0] < end and first < _span(model_state[n])[1]
            )
            raise CheckpointError(
                f"{name} and {later} differ where the model keeps them in the same memory (one "
                "is a view of the other)"
            )


# The seed of each float64 forward that balance_state_dict compares: a forward that draws
# (dropout in training mode, noise) draws the same before and after balancing.
FORWARD_SEED = 0


def _outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """:func:`float64_outputs` of ``model`` on ``x`` with torch's random state (CPU and the CUDA
    devices of ``model``'s tensors) seeded with :data:`FORWARD_SEED`, and restored after: every
    forward draws the same numbers, as :func:`gaugefix.verify`'s do."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    cuda = sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(FORWARD_SEED)
        return float64_outputs(model, x)


def _reference(model: nn.Module, x: Tensor) -> tuple[list[Tensor], float]:
    """The floating outputs of ``model`` on ``x`` and their ``max |f(x)|``;
    :class:`CheckpointError` when there are none, they are not finite, or they are all zero (a
    change of the function would not show in them)."""
    reference = _outputs(model, x)
    if not reference:
        raise CheckpointError("the model's output on the example input holds no floating tensor")
    if not all_finite(reference):
        raise CheckpointError("the model's output on the example input is not finite")
    scale = max((float(t.abs().max()) for t in reference if t.numel()), default=0.0)
    if scale == 0:
        raise CheckpointError(
            "the model's outputs on the example input are all zero: they cannot show whether "
            "balancing keeps the function; give an example input on which they are not"
        )
    return reference, scale


def _check_references(model: nn.Module, checks: list[Tensor]) -> list[list[Tensor]]:
    """The floating outputs of the float64 ``model`` on each check input (shape ``[B', ...]``,
    other sizes than the example's); :class:`CheckpointError` naming the input's shape when the
    model fails on it, or its outputs are not finite, or all zero or none (a change of the
    function would not show in them)."""
    references = []
    for c in checks:
        shape = tuple(c.shape)
        try:
            outputs = _outputs(model, c)
        except Exception as err:  # whatever the model's own forward raises at other sizes
            raise CheckpointError(
                f"the model fails on the check input of shape {shape} "
                f"({type(err).__name__}: {first_line(err)})"
            ) from None
        if not all_finite(outputs):
            raise CheckpointError(
                f"the model's output on the check input of shape {shape} is not finite"
            )
        if not any(bool(t.any()) for t in outputs):
            held = "are all zero" if outputs else "hold no floating tensor"
            raise CheckpointError(
                f"the model's outputs on the check input of shape {shape} {held}: they "
                "cannot show whether balancing keeps the function; give a check input on which "
                "they are not"
            )
        references.append(outputs)
    return references


def _check_changes(
    model: nn.Module, checks: list[Tensor], references: list[list[Tensor]]
) -> tuple[tuple[float, ...], ...]:
    """For each check input, the relative change of each floating output of the float64
    ``model`` against its ``references`` (:func:`gaugefix.precision.relative_changes`)."""
    return tuple(
        relative_changes(_outputs(model, c), r) for c, r in zip(checks, references, strict=True)
    )


def _max_change(a: list[Tensor], b: list[Tensor]) -> float:
    """``max |a - b|`` over every entry (NaN when any difference is NaN)."""
    values = [float((u - v).abs().max()) for u, v in zip(a, b, strict=True) if u.numel()]
    return math.nan if any(math.isnan(v) for v in values) else max(values, default=0.0)


def _load64(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    model.load_state_dict(
        {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in tensors.items()}
    )


def _rounded(
    balanced: dict[str, Tensor], tensors: Mapping[str, Tensor], params: set[str]
) -> dict[str, Tensor]:
    """The ``balanced`` float64 weights under the names of ``tensors``, each rounded to its
    tensor's dtype (tensors that shared storage share it again where their balanced values are
    equal: a file may tie what the model does not); an entry that is not one of the model's
    ``params`` (a buffer: no generator acts on it, though a forward may have updated it) is a
    copy of the file's tensor. :class:`CheckpointError` for a changed weight that overflows its
    dtype."""
    written: dict[str, Tensor] = {}
    by_storage: dict[tuple, Tensor] = {}
    for name, t in tensors.items():
        source = balanced[name] if name in params else t
        value = source.to(t.dtype, copy=True).contiguous()
        shared = by_storage.setdefault(_storage_key(t), value)
        written[name] = shared if torch.equal(shared, value) else value
    for name, t in tensors.items():
        if not torch.equal(written[name], t) and not all_finite([written[name]]):
            raise CheckpointError(f"balanced {name} does not fit in {t.dtype} (overflow to inf)")
    return written


def _written(
    model: nn.Module, tensors: Mapping[str, Tensor], ties: dict[str, Tensor]
) -> tuple[dict[str, Tensor], list[str]]:
    """The balanced float64 ``model``'s weights under the names of ``tensors``, rounded to their
    dtypes (:func:`_rounded`), and loaded back into ``model``; with the names of the weights
    balancing moved (in float64: their rounding may give back the file's values, and still
    changes the function by up to their dtype's precision). :class:`CheckpointError` when
    they break a tie of the original model's state dict ``ties`` (a buffer sharing a weight's
    storage, which the float64 copy's ``.to`` unties: the stale buffer would overwrite the
    balanced weight when loaded)."""
    balanced = model.state_dict()
    weights = {_storage_key(p) for p in model.parameters()}  # and what shares their storage
    params = {name for name, t in balanced.items() if _storage_key(t) in weights}
    moved = [
        name
        for name, t in tensors.items()
        if name in params and not torch.equal(balanced[name], t.to(balanced[name].dtype))
    ]
    written = _rounded(balanced, tensors, params)
    try:
        _load64(model, _complete(ties, written))
    except CheckpointError as err:
        raise CheckpointError(f"balancing would break a tie of the model: {err}") from None
    return written, moved


def _moved(
    model: nn.Module,
    structure: gaugefix.GaugeStructure,
    objective: str,
    calibration: Tensor | None,
    alpha: float | None,
) -> BalanceResult | EqualizeResult:
    """``balance_`` (``objective="norm"``) or ``equalize_`` of the float64 ``model`` in place,
    the arguments checked as ``equalize_`` checks them; their ``ValueError`` as a
    :class:`CheckpointError`."""
    if calibration is not None and calibration.is_floating_point():
        calibration = calibration.to(torch.float64)
    try:
        if objective_name(objective, calibration, alpha, None) == "norm":
            return gaugefix.balance_(model, structure)
        return gaugefix.equalize_(model, structure, objective, calibration=calibration, alpha=alpha)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _refuse_sharding(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """:class:`~gaugefix.ShardingError` for sharded ``tensors`` (DTensors) or a ``model``
    sharded with ``fully_shard``."""
    refuse_sharded(dict(tensors))
    if uses_fully_shard(model):
        raise ShardingError(
            "the model is sharded with fully_shard: pass an unsharded instance of it (it is "
            "only copied), and a full state dict"
        )


def balance_state_dict(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    x: Tensor,
    objective: str = "norm",
    calibration: Tensor | None = None,
    alpha: float | None = None,
    allow_value_dependent: bool = False,
    *,
    checks: Sequence[Tensor] = (),
) -> tuple[dict[str, Tensor], CheckpointBalance]:
    """Balance the weights ``tensors`` of ``model`` (name -> tensor; the floating ones in
    float64, float32, float16 or bfloat16), or move them to the orbit point of another
    ``objective`` of :func:`gaugefix.equalize_` (``calibration``, floating inputs cast to
    float64, and ``alpha`` for ``"activation"``).

    A float64 copy of ``model`` in eval mode gets the weights, its gauge structure is discovered
    on the example input ``x`` (floating inputs are cast to float64; integer inputs such as token
    ids are used as they are), :func:`gaugefix.balance_` moves it to the minimal-norm point of its
    orbit, and the balanced weights are returned under the names of ``tensors``, each in its own
    dtype (tensors that shared storage share it again where they stay equal). ``model`` is not
    modified (the copy runs ``grouped_mm`` experts with ``batched_mm``, outputs in float64).
    ``allow_value_dependent``: :func:`gaugefix.discover`'s (structure found on ``x``'s path).
    A transformers model's checkpoint in ``save_pretrained``'s layout (a mixture's experts one
    by one) goes to the model's and back by transformers (:func:`_model_layout`).
    ``checks``: inputs of other sizes, cast as ``x`` is, whose outputs are compared as ``x``'s
    (a structure exact at ``x``'s sizes may not be at others: a size no trace sees), each one
    the model runs on with finite floating outputs not all zero (else a :class:`CheckpointError`).
    Whether the result may be used is :attr:`CheckpointBalance.within_tolerance`."""
    _refuse_sharding(model, tensors)
    x, *checks = (t.to(torch.float64) if t.is_floating_point() else t for t in (x, *checks))
    ties = model.state_dict()  # the model's own ties (the float64 copy may lose some)
    saved = dict(tensors)
    tensors = _model_layout(model, ties, saved)
    original, model = model, float64_copy(model, CheckpointError, "balancing works on a copy")
    _load64(model.eval(), _complete(ties, tensors))
    structure = gaugefix.discover(model, x, allow_value_dependent=allow_value_dependent)
    (reference, scale), references = _reference(model, x), _check_references(model, checks)
    before = gaugefix.imbalance_stats(model, structure)
    result = _moved(model, structure, objective, calibration, alpha)
    exact, exact_checks = _outputs(model, x), _check_changes(model, checks, references)
    written, moved = _written(model, tensors, ties)
    rounded = _outputs(model, x)
    dtypes = [tensors[name].dtype for name in moved]
    report = CheckpointBalance(
        num_generators=structure.num_generators,
        before=before,
        after=gaugefix.imbalance_stats(model, structure),
        result=result,
        output_scale=scale,
        exact_change=_max_change(exact, reference),
        output_change=_max_change(rounded, reference),
        dtype=max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float64),
        per_output_exact=relative_changes(exact, reference),
        per_output_change=relative_changes(rounded, reference),
        check_shapes=tuple(tuple(c.shape) for c in checks),
        per_check_exact=exact_checks,
        per_check_change=_check_changes(model, checks, references),
    )
    return _file_layout(original, written, saved, tensors), report


def _transformers_model(model: nn.Module) -> bool:
    """``model`` is a transformers ``PreTrainedModel`` (transformers is not imported for it)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _differs(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> str | None:
    """The first name whose tensor differs between ``a`` and ``b`` (missing from one, or of
    another dtype, shape or value, bit for bit: a NaN equals itself), or None when none does."""
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))[0]
    for name, t in a.items():
        u = b[name]
        if t.dtype != u.dtype or t.shape != u.shape or not torch.equal(_bits(t), _bits(u)):
            return name
    return None


def _bits(t: Tensor) -> Tensor:
    """The bytes of ``t``'s entries, in order (shape ``(numel * element_size,)``)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _hf_loaded(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` in the model's layout, as ``from_pretrained`` converts a checkpoint
    (transformers' ``get_model_conversion_mapping``: renamings, then at most one converter
    per name, such as the experts' ``MergeModulelist`` and ``Concatenate``), each tensor in the
    dtype the conversion gives; nothing is loaded. :class:`CheckpointError` when a conversion
    fails or this transformers has no such conversion (before 5)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        unknown = sorted(set(tensors) - set(model.state_dict()))
        raise CheckpointError(
            f"the weights do not fit the model: {_listed(unknown)} not in the model (this "
            "transformers converts no checkpoint layout)"
        ) from None

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    names = model.state_dict()
    groups: dict[str, Any] = {}
    for name, t in tensors.items():
        key, pattern = rename_source_key(
            name, renamings, converters, model.base_model_prefix, names
        )
        if pattern is None:
            group = groups.setdefault(key, WeightRenaming(name, key))
            pattern = name
        else:
            group = groups.setdefault(key, copy.deepcopy(by_pattern[pattern]))
        group.add_tensor(key, name, pattern, t)
    converted = {}
    for key, group in groups.items():
        try:
            done = group.convert(key, model=model, config=model.config)
        except Exception as err:  # whatever a conversion op raises for tensors it cannot join
            raise CheckpointError(
                f"the weights do not fit the model: transformers' conversion of the checkpoint "
                f"layout to {key} failed ({type(err).__name__}: {first_line(err)})"
            ) from None
        converted.update({k: v[0] if isinstance(v, list) else v for k, v in done.items()})
    return converted


def _hf_saved(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` (the model's layout) in the checkpoint layout, as ``save_pretrained`` writes
    them (transformers' ``revert_weight_conversion``)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def _model_layout(
    model: nn.Module, model_state: Mapping[str, Tensor], tensors: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``tensors`` in ``model``'s layout: as they are when every name is one of the model's
    state dict ``model_state`` or ``model`` is no transformers model; else converted by
    :func:`_hf_loaded`, when :func:`_hf_saved` gives the file's tensors back bit for bit, names
    and dtypes included (:class:`CheckpointError` otherwise, and for names that fit no module
    wrapping a transformers model, whose checkpoint layout is not converted)."""
    if set(tensors) <= set(model_state):
        return tensors
    if not _transformers_model(model):
        if any(map(_transformers_model, model.modules())):
            unknown = sorted(set(tensors) - set(model_state))
            raise CheckpointError(
                f"the weights do not fit the model: {_listed(unknown)} not in the model; a "
                "checkpoint written by save_pretrained is converted only when the "
                "factory returns the transformers model itself: return it, or pass the state dict "
                "the model loads, torch.save(model.state_dict(), 'weights.pt')"
            )
        return tensors
    converted = _hf_loaded(model, tensors)
    unknown, _ = _refuse_foreign(model_state, converted)
    if unknown:
        raise CheckpointError(
            f"the weights do not fit the model: {_listed(unknown)} not in the model (named as "
            "transformers' conversion of the checkpoint layout names them)"
        )
    lost = _differs(_hf_saved(model, converted), tensors)
    if lost is not None:
        raise CheckpointError(
            f"transformers' conversion of the checkpoint layout to {type(model).__name__}'s and "
            f"back does not give back {lost} (name, dtype and values): it cannot be written "
            "back in its layout"
        )
    return converted


def _file_layout(
    model: nn.Module,
    written: dict[str, Tensor],
    saved: dict[str, Tensor],
    tensors: dict[str, Tensor],
) -> dict[str, Tensor]:
    """The balanced ``written`` (under the names of ``tensors``) in the file's layout ``saved``:
    as they are when ``tensors`` is ``saved``; else by :func:`_hf_saved`, with the names, dtypes
    and shapes of ``saved``, and what :func:`_hf_loaded` makes of it, what ``from_pretrained``
    loads, ``written`` bit for bit (:class:`CheckpointError` otherwise)."""
    if tensors is saved:
        return written
    reverted = _hf_saved(model, written)
    shapes = {k: (t.dtype, t.shape) for k, t in saved.items()}
    if {k: (t.dtype, t.shape) for k, t in reverted.items()} != shapes or _differs(
        _hf_loaded(model, reverted), written
    ):
        raise CheckpointError(
            "transformers' conversion of the balanced weights to the checkpoint layout does not "
            "give back the checkpoint's names, dtypes and shapes, or the balanced weights"
        )
    return reverted
