"""``gaugefix balance`` on a sharded checkpoint, given by its index: a tiny tied Llama saved by
``save_pretrained(max_shard_size="20KB")`` (several safetensors shards), and the same shards as
PyTorch files under a ``pytorch_model.bin.index.json``. The balance is that of the checkpoint
saved as one file, bit for bit, written back in the same layout; indices that contradict their
shards are refused in one line; a write that fails leaves every file as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import gaugefix
from faults import full_disk, listing
from gaugefix.checkpoint import CheckpointBalance, read_state_dict
from gaugefix.files import OutputError, write_all
from test_cli_audit5 import _balance, _gauged, _ids, _refused, llama  # one tiny tied Llama

transformers = pytest.importorskip("transformers")

INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def _sharded(tmp_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The gauged Llama in ``dtype``, sharded by ``save_pretrained``: its directory."""
    _gauged(dtype).save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    return tmp_path / "ckpt"


def _as_torch(ckpt: Path) -> Path:
    """The safetensors shards of ``ckpt`` as PyTorch files (``torch.save`` of each shard's
    state dict) under a ``pytorch_model.bin.index.json``, in a directory beside it."""
    index = json.loads((ckpt / INDEX).read_text())
    target = ckpt.parent / "torch"
    target.mkdir()
    names = {}
    for shard in dict.fromkeys(index["weight_map"].values()):
        names[shard] = shard.replace(".safetensors", ".bin")
        torch.save(read_state_dict(ckpt / shard).tensors, target / names[shard])
    index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
    (target / TORCH_INDEX).write_text(json.dumps(index))
    return target / TORCH_INDEX


def _shards(index: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each shard file the index names, and its tensors."""
    files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
    return {f: read_state_dict(index.parent / f).tensors for f in files}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _untouched(model: nn.Module) -> set[str]:
    """The names of the state dict no generator of ``model``'s structure acts on."""
    structure = gaugefix.discover(model, _ids(0))
    acted = set(structure.params) | {
        a for p in structure.params for a in (structure.aliases or {}).get(p, ())
    }
    return set(model.state_dict()) - acted


def _logits(directory: Path) -> torch.Tensor:
    """The float64 logits, on fresh token ids, of the model ``from_pretrained`` loads."""
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(_ids(5, (4, 16))).logits


# -- 1. the balance of the checkpoint as one file, in the shards' layout -------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sharded_checkpoint_is_balanced_as_one_file_and_keeps_its_layout(tmp_path, dtype):
    """Each shard holds the names, dtypes, shapes and metadata it held, the index is the same
    file (its ``total_size`` the bytes of the written tensors), the tensors no generator acts
    on are bit-identical, the weights are those of the same checkpoint saved as one file and
    balanced, bit for bit, and ``from_pretrained`` loads a model whose float64 logits moved
    within the output check's tolerance."""
    ckpt = _sharded(tmp_path, dtype)
    _gauged(dtype).save_pretrained(tmp_path / "one")
    out, one = tmp_path / "out" / INDEX, tmp_path / "one-out.safetensors"
    result = _balance(ckpt / INDEX, out)
    assert result.exit_code == 0, result.output
    assert "and its " in result.stdout and " shards (safetensors, " in result.stdout
    assert _balance(tmp_path / "one" / "model.safetensors", one).exit_code == 0

    assert out.read_bytes() == (ckpt / INDEX).read_bytes()
    before, after = _shards(ckpt / INDEX), _shards(out)
    assert len(before) > 2 and list(after) == list(before)
    for f, tensors in before.items():
        written = read_state_dict(out.parent / f)
        assert written.metadata == read_state_dict(ckpt / f).metadata
        layout = [(k, t.dtype, t.shape) for k, t in tensors.items()]
        assert [(k, t.dtype, t.shape) for k, t in written.tensors.items()] == layout
    sizes = sum(t.numel() * t.element_size() for s in after.values() for t in s.values())
    assert json.loads(out.read_text())["metadata"]["total_size"] == sizes

    merged = {k: t for s in after.values() for k, t in s.items()}
    original = {k: t for s in before.values() for k, t in s.items()}
    single = read_state_dict(one).tensors
    assert set(single) == set(merged)
    assert all(torch.equal(_bits(merged[k]), _bits(single[k])) for k in single)
    untouched = _untouched(llama()) & set(merged)
    assert untouched and len(untouched) < len(merged)
    assert all(torch.equal(_bits(merged[k]), _bits(original[k])) for k in untouched)
    assert sum(not torch.equal(merged[k], original[k]) for k in merged) >= len(merged) // 2

    shutil.copy(ckpt / "config.json", out.parent)
    logits, balanced = _logits(ckpt), _logits(out.parent)
    change = float((balanced - logits).abs().max() / logits.abs().max())
    assert change <= CheckpointBalance.relative_tolerance(dtype)


def test_pytorch_shards_are_balanced_in_place_as_one_pytorch_file(tmp_path):
    """PyTorch shards under ``pytorch_model.bin.index.json``, written over themselves: PyTorch
    files again, the same names in each, the weights those of the single PyTorch file."""
    index = _as_torch(_sharded(tmp_path))
    torch.save(_gauged(torch.float32).state_dict(), tmp_path / "one.bin")
    before = _shards(index)
    assert _balance(index, index).exit_code == 0
    assert _balance(tmp_path / "one.bin", tmp_path / "one-out.bin").exit_code == 0
    after = _shards(index)
    assert {f: list(s) for f, s in after.items()} == {f: list(s) for f, s in before.items()}
    assert all(read_state_dict(index.parent / f).format == "torch" for f in after)
    single = read_state_dict(tmp_path / "one-out.bin").tensors
    merged = {k: t for s in after.values() for k, t in s.items()}
    assert all(torch.equal(_bits(t), _bits(single[k])) for k, t in merged.items())
    assert any(not torch.equal(t, before[f][k]) for f, s in after.items() for k, t in s.items())


# -- 2. indices that contradict their shards ------------------------------------------------------


def _resave(shard: Path) -> None:
    """``shard`` written again as a PyTorch file (beside it, then renamed: the file read is
    mapped in memory)."""
    torch.save(read_state_dict(shard).tensors, shard.with_name("resaved"))
    shard.with_name("resaved").replace(shard)


def _edit_map(ckpt: Path, edit) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    edit(index["weight_map"])
    (ckpt / INDEX).write_text(json.dumps(index))


def _missing_file(ckpt: Path) -> str:
    _edit_map(ckpt, lambda m: m.update({next(iter(m)): "model-gone.safetensors"}))
    return "its weight_map names model-gone.safetensors, missing from "


def _listed_twice(ckpt: Path) -> str:
    """A name given twice in the index's JSON, naming two shards (JSON would keep the last)."""
    text = (ckpt / INDEX).read_text()
    name, shard = next(iter(json.loads(text)["weight_map"].items()))
    other = next(f for f in sorted(ckpt.glob("model-*")) if f.name != shard).name
    entry = f'"{name}": "{shard}"'
    assert entry in text
    (ckpt / INDEX).write_text(text.replace(entry, f'{entry}, "{name}": "{other}"'))
    return f"the index lists {name} twice"


def _in_two_shards(ckpt: Path) -> str:
    """A tensor written into a second shard as well."""
    shards = sorted(ckpt.glob("model-*.safetensors"))
    first, second = read_state_dict(shards[0]), read_state_dict(shards[1])
    name = next(iter(first.tensors))
    second.tensors[name] = first.tensors[name]
    gaugefix.checkpoint.write_state_dict(second, shards[1])
    return f"{name} is in two shards, {shards[0].name} and {shards[1].name}"


def _not_in_map(ckpt: Path) -> str:
    name = next(iter(json.loads((ckpt / INDEX).read_text())["weight_map"]))
    _edit_map(ckpt, lambda m: m.pop(name))
    return f"{name} is in "


def _torch_shard(ckpt: Path) -> str:
    """A shard named ``.safetensors`` that is a PyTorch file."""
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    _resave(shard)
    return f"its shard {shard.name} is a torch file, not safetensors as the names say"


def _mixed(ckpt: Path) -> str:
    """A shard renamed ``.bin`` (in the index too) beside ``.safetensors`` ones."""
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.rename(shard.with_suffix(".bin"))
    _edit_map(ckpt, lambda m: m.update({k: v.replace(shard.name, shard.with_suffix(".bin").name)
                                        for k, v in m.items()}))  # fmt: skip
    return "mix the safetensors and torch formats"


def _mixed_contents(ckpt: Path) -> str:
    """Shards whose names say no format (``.dat``), one a PyTorch file, the others safetensors,
    under an index whose name says none either."""
    shards = sorted(ckpt.glob("model-*.safetensors"))
    for f in shards:
        f.rename(f.with_suffix(".dat"))
    _resave(shards[1].with_suffix(".dat"))
    _edit_map(
        ckpt, lambda m: m.update({k: v.replace(".safetensors", ".dat") for k, v in m.items()})
    )
    (ckpt / INDEX).rename(ckpt / "weights.index.json")
    return f"is a torch file, not safetensors as {shards[0].with_suffix('.dat').name} is (mixed"


@pytest.mark.parametrize(
    "spoil",
    [
        _missing_file,
        _listed_twice,
        _in_two_shards,
        _not_in_map,
        _torch_shard,
        _mixed,
        _mixed_contents,
    ],
)
def test_an_index_that_contradicts_its_shards_is_refused_in_one_line(tmp_path, spoil):
    """Nothing written, the checkpoint untouched."""
    ckpt = _sharded(tmp_path)
    message = spoil(ckpt)
    index = next(ckpt.glob("*.index.json"))
    before, out = listing(ckpt), tmp_path / "out" / index.name
    _refused(_balance(index, out), message)
    assert listing(ckpt) == before and not (tmp_path / "out").exists()


# -- 3. all or nothing ----------------------------------------------------------------------------


@pytest.mark.parametrize("in_place", [True, False])
def test_a_write_that_fails_midway_leaves_every_file_as_it_was(tmp_path, monkeypatch, in_place):
    """The disk fills at the third shard's temporary file: the two shards before it are not
    renamed over theirs, and neither the index nor any temporary file is left (written over
    the checkpoint, or to a new directory, which is removed)."""
    ckpt = _sharded(tmp_path)
    third = sorted(p.name for p in ckpt.glob("model-*.safetensors"))[2]
    out = ckpt / INDEX if in_place else tmp_path / "out" / INDEX
    before = listing(ckpt)
    full_disk(monkeypatch, out.parent, f".{third}.*")
    _refused(_balance(ckpt / INDEX, out), f"cannot write {out.parent / third}: No space left")
    assert listing(ckpt) == before
    assert in_place or not out.parent.exists()
    monkeypatch.undo()
    assert _balance(ckpt / INDEX, out).exit_code == 0  # the same command, on a disk with room
    after = listing(out.parent)
    assert after[INDEX] == before[INDEX] and after[third] != before[third]


def test_an_out_that_is_one_of_the_shards_is_refused_before_anything_is_written(tmp_path):
    """``--out`` named as a shard of the index: the index would replace that shard."""
    ckpt = _sharded(tmp_path)
    shard = sorted(p.name for p in ckpt.glob("model-*.safetensors"))[0]
    before = listing(ckpt)
    _refused(_balance(ckpt / INDEX, ckpt / shard), "it is also another of the files written")
    assert listing(ckpt) == before


# -- 4. the directory written to ------------------------------------------------------------------


def _shard_names(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.glob("model-*.safetensors"))


def _other_model(directory: Path, names: list[str]) -> None:
    """Another model's files in ``directory``: one under each of ``names``, and seven shards
    ``model-0000k-of-00007.safetensors``, under an index ``other.safetensors.index.json``."""
    directory.mkdir()
    sevens = [f"model-{k:05d}-of-00007.safetensors" for k in range(1, 8)]
    for name in [*names, *sevens]:
        (directory / name).write_bytes(b"another model's " + name.encode())
    weight_map = {f"w{k}": f for k, f in enumerate(sevens)}
    (directory / "other.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_shard_names_of_another_model_in_the_directory_written_to_are_refused(tmp_path):
    """``--out`` in a directory holding files with the shards' names that no index at
    ``--out`` names (another model's): refused before any work, every file as it was."""
    ckpt = _sharded(tmp_path)
    out = tmp_path / "out"
    _other_model(out, _shard_names(ckpt)[:1])
    before = listing(out)
    shard = out / _shard_names(ckpt)[0]
    _refused(_balance(ckpt / INDEX, out / INDEX), f"cannot write {shard}: a file of that name")
    assert listing(out) == before


def test_a_file_that_appears_while_balancing_is_refused_by_the_write_in_one_line(
    tmp_path, monkeypatch
):
    """A file with a shard's name that appears in the output directory after the command's
    early check (here: the early check skipped) is refused by the write itself, in one line
    with nothing written (it raised a traceback)."""
    ckpt = _sharded(tmp_path)
    out = tmp_path / "out"
    _other_model(out, _shard_names(ckpt)[:1])
    before = listing(out)
    monkeypatch.setattr(gaugefix.cli, "check_output", lambda state, path: None)
    shard = out / _shard_names(ckpt)[0]
    _refused(_balance(ckpt / INDEX, out / INDEX), f"cannot write {shard}: a file of that name")
    assert listing(out) == before


def test_a_new_index_beside_the_shards_read_is_refused(tmp_path):
    """``--out`` a new index in the checkpoint's directory: its shards would replace those the
    index read names (the checkpoint read, changed under another index's name)."""
    ckpt = _sharded(tmp_path)
    before = listing(ckpt)
    out = ckpt / "balanced.safetensors.index.json"
    _refused(_balance(ckpt / INDEX, out), f"{out} is no index naming it")
    assert listing(ckpt) == before


def test_a_shard_another_index_names_with_other_files_is_refused_in_place(tmp_path):
    """In place, a shard that another index of the directory names beside a file not written
    (it would name a balanced shard among unbalanced ones): refused, nothing written."""
    ckpt = _sharded(tmp_path)
    shard = _shard_names(ckpt)[1]
    (ckpt / "extra.safetensors").write_bytes(b"an unbalanced shard")
    weight_map = {"a": shard, "b": "extra.safetensors"}
    (ckpt / "merged.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    before = listing(ckpt)
    _refused(_balance(ckpt / INDEX, ckpt / INDEX), "merged.safetensors.index.json names it too")
    assert listing(ckpt) == before


def test_the_checkpoint_at_out_is_replaced_and_other_files_are_left_as_they_were(tmp_path):
    """``--out`` an index whose shards are there (the same command run twice, or another
    checkpoint with other shard names): the index and the shards it names are written, the
    index as it was read, byte for byte (a wrong ``total_size`` and members of its own kept),
    and every other file is left as it was."""
    ckpt = _sharded(tmp_path)
    index = json.loads((ckpt / INDEX).read_text())
    index["metadata"]["total_size"] = 1
    index["made_by"] = ["a tool", 2]
    (ckpt / INDEX).write_text(json.dumps(index, indent=1))
    out = tmp_path / "out"
    _other_model(out, [])
    others = listing(out)
    assert _balance(ckpt / INDEX, out / INDEX).exit_code == 0
    first = listing(out)
    assert _balance(ckpt / INDEX, out / INDEX).exit_code == 0
    assert listing(out) == first and first[INDEX] == (ckpt / INDEX).read_bytes()
    assert {k: first[k] for k in others} == others
    assert set(first) == set(others) | {INDEX, *_shard_names(ckpt)}


def test_a_pytorch_file_named_safetensors_is_refused_in_one_line(tmp_path):
    """Not safetensors' ``header too large``: what the file is, and what to name it."""
    torch.save(_gauged(torch.float32).state_dict(), tmp_path / "model.safetensors")
    out = tmp_path / "out.safetensors"
    _refused(
        _balance(tmp_path / "model.safetensors", out),
        "model.safetensors is named .safetensors but is not a safetensors file (an 8-byte "
        "header length, then a JSON header): it is a PyTorch file (torch.save); name it .pt",
    )
    assert not out.exists()


# -- 5. costs linear in the numbers of names and files --------------------------------------------

# Enough names and files that a check quadratic in them takes minutes here (linear: under a
# second); no clock is read: the suite's durations (make test prints the slowest) show a regression.
MANY_NAMES, MANY_FILES = 200_000, 20_000


def test_a_name_listed_twice_among_many_is_found(tmp_path):
    """An index listing ``MANY_NAMES`` tensors, one of them twice: found (by a count of each
    name, linear in the names)."""
    entries = [f'"layer.{k}.weight": "model-{k % 100:05d}.safetensors"' for k in range(MANY_NAMES)]
    entries.append('"layer.7.weight": "model-00001.safetensors"')
    path = tmp_path / INDEX
    path.write_text('{"weight_map": {' + ", ".join(entries) + "}}")
    with pytest.raises(gaugefix.checkpoint.CheckpointError, match="lists layer.7.weight twice"):
        read_state_dict(path)


def test_write_all_refuses_a_second_name_among_many_files(tmp_path):
    """``MANY_FILES`` files, the last a second name of the first: refused (by a count of each
    target, linear in the files), nothing written."""
    files = [(tmp_path / "out" / f"shard-{k}", lambda: b"") for k in range(MANY_FILES)]
    files.append((tmp_path / "out" / "." / "shard-0", lambda: b""))
    with pytest.raises(OutputError, match="it is also another of the files written"):
        write_all(files)
    assert not (tmp_path / "out").exists()


def test_pytorch_shards_hold_their_own_entries_of_a_storage_shared_across_shards(tmp_path):
    """Two halves of one tensor (views, as the experts ``save_pretrained`` splits from a merged
    one) in two PyTorch shards: each file holds its half, not the whole storage twice (what
    ``torch.save`` writes for a view), and reads back bit for bit."""
    whole = torch.arange(2 * 50_000, dtype=torch.float64)
    halves = dict(zip(["a", "b"], whole.chunk(2), strict=True))
    weight_map = {"a": "one.bin", "b": "two.bin"}
    index = gaugefix.checkpoint.ShardIndex(
        json.dumps({"weight_map": weight_map}).encode(),
        weight_map,
        {"one.bin": ["a"], "two.bin": ["b"]},
        {"one.bin": None, "two.bin": None},
    )
    state = gaugefix.checkpoint.StateDictFile(halves, "torch", None, index)
    gaugefix.checkpoint.write_state_dict(state, tmp_path / TORCH_INDEX)
    half = whole.numel() * whole.element_size() // 2
    for name, f in weight_map.items():
        assert (tmp_path / f).stat().st_size < half * 1.1
        assert torch.equal(_bits(read_state_dict(tmp_path / f).tensors[name]), _bits(halves[name]))
    assert torch.equal(
        _bits(read_state_dict(tmp_path / TORCH_INDEX).tensors["b"]), _bits(halves["b"])
    )
