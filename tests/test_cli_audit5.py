"""Fifth audit of ``gaugefix balance`` and ``gaugefix inspect`` on checkpoint files: a tiny tied
Llama saved by ``save_pretrained`` (one file or sharded) and as a PyTorch state dict in float32,
float16 and bfloat16; files that are not a state dict (a shard alone, a JSON
configuration, a whole pickled model, bytes of no format); an output that cannot be written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import gaugefix
from faults import full_disk, listing, read_only
from gaugefix.checkpoint import read_state_dict
from gaugefix.cli import app

transformers = pytest.importorskip("transformers")

cli = CliRunner()
HERE = "test_cli_audit5"
VOCAB, IDS = 40, "1,8"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TORCH_ADVICE = "weights_only` set to `False`"  # torch's advice, which runs the file's code


def llama() -> nn.Module:
    """A tiny Llama (2 layers, width 32, ReLU MLP) whose output layer is the token embedding."""
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, hidden_act="relu", tie_word_embeddings=True,
        use_cache=False, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def _ids(seed: int, shape: tuple[int, ...] = (1, 8)) -> torch.Tensor:
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _gauged(dtype: torch.dtype) -> nn.Module:
    """``llama()`` moved along its orbit (far from balanced, the same function), in ``dtype``."""
    torch.manual_seed(0)
    model = llama().eval()
    structure = gaugefix.discover(model, _ids(0))
    gaugefix.random_gauge_(model, structure, 1.5, torch.Generator().manual_seed(1))
    return model.to(dtype)


def _balance(src: Path, out: Path):
    args = ["balance", "--model", f"{HERE}:llama", "--weights", str(src), "--out", str(out)]
    return cli.invoke(app, [*args, "--input-ids", IDS, "--vocab", str(VOCAB)])


def _refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.output


def _logits(tensors: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = llama().double().eval()
    model.load_state_dict({k: v.double() for k, v in tensors.items()}, strict=False)
    model.tie_weights()  # a safetensors file leaves the tied head out
    with torch.no_grad():
        return model(ids).logits


def _saved(tmp_path: Path, fmt: str, dtype: torch.dtype) -> Path:
    """The gauged Llama in ``dtype``: ``save_pretrained``'s one safetensors file (the tied head
    left out), or ``torch.save`` of its state dict (the head and the embedding one storage)."""
    model = _gauged(dtype)
    if fmt == "safetensors":
        model.save_pretrained(tmp_path / "ckpt")
        return tmp_path / "ckpt" / "model.safetensors"
    torch.save(model.state_dict(), tmp_path / "weights.bin")
    return tmp_path / "weights.bin"


# -- 1. the file's layout, the function, and a second balance -----------------------------------


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [("safetensors", "float32"), ("safetensors", "bfloat16"), ("torch", "float16")],
)  # every dtype in both formats: test_checkpoint_audit2.py's GPT-2
def test_a_tied_llama_keeps_its_layout_and_function_and_rebalances_to_itself(tmp_path, fmt, dtype):
    """Names, shapes, dtypes, metadata and ties are the input's; on fresh token ids the logits
    move within the dtype's rounding; balancing the written file again moves no entry by more
    than one rounding (``eps`` of its dtype, relative)."""
    src = _saved(tmp_path, fmt, DTYPES[dtype])
    state, once, twice = read_state_dict(src), tmp_path / "once.bin", tmp_path / "twice.bin"
    assert _balance(src, once).exit_code == 0
    written = read_state_dict(once)
    assert (written.format, written.metadata) == (state.format, state.metadata)
    layout = {k: (v.dtype, v.shape) for k, v in state.tensors.items()}
    assert {k: (v.dtype, v.shape) for k, v in written.tensors.items()} == layout
    if fmt == "torch":
        head, emb = written.tensors["lm_head.weight"], written.tensors["model.embed_tokens.weight"]
        assert head.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()
    moved = sum(not torch.equal(written.tensors[k], v) for k, v in state.tensors.items())
    assert moved >= len(state.tensors) // 2
    fresh, eps = _ids(5, (4, 16)), torch.finfo(DTYPES[dtype]).eps
    before, after = _logits(state.tensors, fresh), _logits(written.tensors, fresh)
    assert float((after - before).abs().max() / before.abs().max()) <= 20 * eps

    assert _balance(once, twice).exit_code == 0
    again = read_state_dict(twice).tensors
    for name, t in written.tensors.items():
        change = (again[name].double() - t.double()).abs()
        assert bool((change <= eps * t.double().abs()).all()), name


# -- 2. files that are not a state dict -----------------------------------------------------------


def test_a_shard_alone_or_a_sharded_checkpoints_directory_is_refused(tmp_path):
    """A shard alone is refused with the names it lacks, the directory as one (its index is
    read: test_checkpoint_sharded.py). Nothing written, the checkpoint untouched."""
    _gauged(torch.float32).save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    before, out = listing(tmp_path / "ckpt"), tmp_path / "out" / "balanced.safetensors"
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(shards) > 2
    _refused(_balance(tmp_path / "ckpt" / shards[0], out), "missing")
    _refused(_balance(tmp_path / "ckpt", out), "is not a regular file (a directory")
    assert listing(tmp_path / "ckpt") == before and not (tmp_path / "out").exists()


def test_a_json_file_that_is_no_index_is_named_as_json(tmp_path):
    _gauged(torch.float32).save_pretrained(tmp_path / "ckpt")
    result = _balance(tmp_path / "ckpt" / "config.json", tmp_path / "out.safetensors")
    _refused(result, "config.json is a JSON file, not weights")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_pickled_model_is_refused_with_what_to_save_not_torchs_advice(tmp_path):
    """``torch.save(model)``: the first line of torch's refusal was "This file can still be
    loaded, to do so you have two options", the options cut off."""
    torch.save(mlp(), tmp_path / "whole.pt")
    args = ["balance", "--model", f"{HERE}:mlp", "--weights", str(tmp_path / "whole.pt")]
    result = cli.invoke(app, [*args, "--out", str(tmp_path / "o.pt"), "--input-shape", "2,5"])
    _refused(result, "it holds objects other than tensors (Unsupported global: GLOBAL torch.nn")
    assert "torch.save(model.state_dict(), 'weights.pt')" in result.stderr
    assert "two options" not in result.stderr and TORCH_ADVICE not in result.stderr


def test_bytes_of_no_format_say_so_not_a_bare_number(tmp_path):
    """The weights-only unpickler's ``KeyError`` was quoted as it is: "...: 101"."""
    (tmp_path / "notes.txt").write_text("hello world\n")
    result = _balance(tmp_path / "notes.txt", tmp_path / "out.bin")
    _refused(result, "neither a zip archive nor a pickle of torch.save (unknown opcode 101)")


# -- 3. an output that cannot be written --------------------------------------------------------


@pytest.mark.parametrize("fault", [read_only, full_disk])
def test_an_unwritable_output_leaves_nothing_and_the_input_as_it_was(tmp_path, monkeypatch, fault):
    src = _saved(tmp_path, "safetensors", torch.bfloat16)
    before, target = listing(src.parent), tmp_path / "out"
    fault(monkeypatch, target)
    result = _balance(src, target / "new" / "balanced.safetensors")
    _refused(result, f"cannot write {target}/new/balanced.safetensors: ")
    assert not target.exists() and listing(src.parent) == before


# -- 4. inspect ---------------------------------------------------------------------------------


def test_inspect_prints_what_discover_finds():
    args = ["inspect", f"{HERE}:llama", "--input-ids", IDS, "--vocab", str(VOCAB)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    model = llama().eval()
    structure = gaugefix.discover(model, _ids(0))
    parameters = sum(p.numel() for p in model.parameters())
    assert result.stdout == f"{HERE}:llama: {parameters} parameters\n{structure.summary()}\n"
    assert f"\n{structure.num_generators} generators (" in result.stdout
