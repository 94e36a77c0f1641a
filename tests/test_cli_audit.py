"""Audit of the command line and checkpoint files: inputs that used to crash with a traceback, be
refused with a misleading line, be silently ignored, or leave something behind on a failure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import gaugefix
from faults import full_disk, listing
from gaugefix.checkpoint import CheckpointError, balance_state_dict, read_state_dict
from gaugefix.cli import app
from gaugefix.files import OutputError, write_bytes
from gaugefix.zoo import mlp

cli = CliRunner()
FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def small_mlp() -> nn.Module:
    return mlp((5, 7, 9, 3))


class WithExtraState(nn.Module):
    """A ReLU MLP whose state dict holds a non-tensor ``_extra_state`` entry."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)))

    def get_extra_state(self) -> dict:
        return {"version": 1}

    def set_extra_state(self, state: dict) -> None:
        pass


def scrambled(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """``small_mlp``'s weights moved off balance by a random gauge, in ``dtype``."""
    torch.manual_seed(0)
    model = small_mlp().double()
    structure = gaugefix.discover(model, torch.randn(1, 5, dtype=torch.float64))
    gaugefix.random_gauge_(model, structure, 1.5, torch.Generator().manual_seed(1))
    return {k: v.detach().to(dtype) for k, v in model.state_dict().items()}


def _one_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def _balance(src, out, *extra: str):
    args = ["balance", "--model", "test_cli_audit:small_mlp", "--weights", str(src)]
    return cli.invoke(app, [*args, "--out", str(out), "--input-shape", "1,5", *extra])


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_a_float8_checkpoint_is_one_line_and_nothing_written(tmp_path, dtype, fmt):
    """It crashed with a NotImplementedError traceback ("isfinite" not implemented)."""
    state = scrambled(dtype)
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    save_file(state, str(src)) if fmt == "safetensors" else torch.save(state, src)
    before = listing(tmp_path)
    _one_line(_balance(src, out), f"is {dtype}: only float64, float32, float16 and bfloat16")
    assert listing(tmp_path) == before
    with pytest.raises(CheckpointError, match="only float64, float32, float16 and bfloat16"):
        balance_state_dict(small_mlp(), state, torch.randn(1, 5))


@pytest.mark.parametrize(
    "form, message",
    [("sparse", "is a torch.sparse_coo tensor: only dense"), ("meta", "is a meta tensor")],
)
def test_a_sparse_or_meta_tensor_in_a_torch_file_is_one_line(tmp_path, form, message):
    """They crashed with a traceback (no ``isfinite`` for sparse tensors; ``bool()`` of a meta
    tensor)."""
    state = scrambled(torch.float32)
    weight = state["0.weight"]
    state["0.weight"] = weight.to_sparse() if form == "sparse" else weight.to("meta")
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(state, src)
    _one_line(_balance(src, out), f"0.weight {message}")
    assert not out.exists()


def meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return small_mlp()


def test_a_model_built_on_the_meta_device_is_named(tmp_path):
    """It was refused only by the tracer ("Tensor on device meta is not on the expected device
    cpu"), after torch's warnings that loading the weights into it was a no-op."""
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(scrambled(), src)
    args = ["balance", "--model", "test_cli_audit:meta_mlp", "--weights", str(src)]
    result = cli.invoke(app, [*args, "--out", str(out), "--input-shape", "1,5"])
    _one_line(result, "the model's 0.weight is on the meta device")
    assert not out.exists()


def test_a_model_with_extra_state_is_one_line(tmp_path):
    """A model whose state dict holds a non-tensor entry crashed with an AttributeError."""
    model = WithExtraState()
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src))
    args = ["balance", "--model", "test_cli_audit:WithExtraState", "--weights", str(src)]
    result = cli.invoke(app, [*args, "--out", str(out), "--input-shape", "2,4"])
    _one_line(result, "the model's state dict holds '_extra_state', a dict, not a tensor")
    assert not out.exists()
    with pytest.raises(CheckpointError, match="'_extra_state', a dict, not a tensor"):
        balance_state_dict(WithExtraState(), tensors, torch.randn(2, 4))


def test_a_torch_file_with_a_non_tensor_entry_names_it(tmp_path):
    """It said the file 'holds a OrderedDict, not a state dict', about ``torch.save`` of a
    ``state_dict()``."""
    src = tmp_path / "in.pt"
    torch.save(WithExtraState().state_dict(), src)
    with pytest.raises(CheckpointError, match="entry '_extra_state' is a dict, not a tensor"):
        read_state_dict(src)


def test_a_directory_as_weights_says_so(tmp_path):
    """It said 'no weights file' about a directory that is there."""
    (tmp_path / "dir").mkdir()
    _one_line(_balance(tmp_path / "dir", tmp_path / "out.pt"), "is not a regular file")
    _one_line(_balance(tmp_path / "none.pt", tmp_path / "out.pt"), "no weights file")


def _corrupt(tmp_path, how: str):
    path = tmp_path / f"{how}.npz"
    np.savez_compressed(path, X=np.random.default_rng(0).normal(size=(16, 5)))
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # a damaged member: its checksum no longer matches
        data[60:70] = b"\xff" * 10
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["truncated", "damaged"])
def test_a_corrupt_calibration_file_is_one_line(tmp_path, how):
    """A truncated or damaged .npz crashed with a zipfile.BadZipFile traceback."""
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(scrambled(), src)
    calibration = _corrupt(tmp_path, how)
    result = _balance(src, out, "--objective", "activation", "--calibration", str(calibration))
    _one_line(result, f"cannot read {calibration} as .npz")
    assert not out.exists()


def test_a_big_endian_calibration_batch_is_read_as_its_values(tmp_path):
    """It was refused ("byte order different from the native byte order")."""
    src = tmp_path / "in.pt"
    torch.save(scrambled(), src)
    batch = np.random.default_rng(0).normal(size=(16, 5)) * np.arange(1, 6)
    np.savez(tmp_path / "native.npz", X=batch)
    np.savez(tmp_path / "big.npz", X=batch.astype(">f8"))
    for name in ("native", "big"):
        calibration = str(tmp_path / f"{name}.npz")
        result = _balance(src, tmp_path / f"{name}.pt", "--objective", "activation",
                          "--calibration", calibration)  # fmt: skip
        assert result.exit_code == 0, result.output
    native, big = (read_state_dict(tmp_path / f"{n}.pt").tensors for n in ("native", "big"))
    assert all(torch.equal(native[k], big[k]) for k in native)


@pytest.mark.parametrize("objective", ["norm", "range"])
def test_alpha_without_activation_is_refused_not_ignored(tmp_path, objective):
    """``--alpha`` only acts with ``--objective activation``; elsewhere it was silently ignored
    (``--calibration`` was refused)."""
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(scrambled(), src)
    result = _balance(src, out, "--objective", objective, "--alpha", "0.7")
    _one_line(result, "--alpha is used only with --objective activation")
    assert not out.exists()


def test_alpha_defaults_to_one_half(tmp_path):
    src = tmp_path / "in.pt"
    torch.save(scrambled(), src)
    for name, extra in (("default", []), ("half", ["--alpha", "0.5"])):
        result = _balance(src, tmp_path / f"{name}.pt", "--objective", "activation", *extra)
        assert result.exit_code == 0, result.output
    default, half = (read_state_dict(tmp_path / f"{n}.pt").tensors for n in ("default", "half"))
    assert all(torch.equal(default[k], half[k]) for k in default)


@pytest.mark.parametrize("extra", [[], ["--scale-groups"]])
def test_inspect_refuses_a_save_target_before_the_work(tmp_path, extra):
    """A directory as ``--save`` was refused only after the summary (or the JSON on stdout) had
    been printed."""
    result = cli.invoke(app, ["inspect", "mlp", "--save", str(tmp_path), *extra])
    _one_line(result, f"cannot write {tmp_path}: it is a directory")


def test_a_failed_write_leaves_no_directory_it_made(tmp_path, monkeypatch):
    """The missing directories of OUT were made, and left behind when the write failed."""
    src = tmp_path / "in.pt"
    torch.save(scrambled(), src)
    disk = tmp_path / "disk"
    disk.mkdir()
    full_disk(monkeypatch, disk)
    out = disk / "new" / "deeper" / "out.pt"
    result = _balance(src, out)
    assert result.exit_code == 2 and "No space left on device" in result.output, result.output
    assert list(disk.iterdir()) == []
    with pytest.raises(OutputError):
        write_bytes(out, b"data")
    assert list(disk.iterdir()) == []


def test_a_write_into_new_directories_makes_them(tmp_path):
    write_bytes(tmp_path / "a" / "b" / "file", b"data")
    assert (tmp_path / "a" / "b" / "file").read_bytes() == b"data"


def test_the_command_runs_from_a_source_tree_without_metadata(monkeypatch, capsys):
    """``python -m gaugefix`` with gaugefix importable but not installed crashed with
    PackageNotFoundError while looking for its command-line extra."""
    from importlib import metadata

    import gaugefix.__main__ as entry

    def not_installed(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "requires", not_installed)
    monkeypatch.setattr("sys.argv", ["gaugefix", "--help"])
    with pytest.raises(SystemExit) as exit_:
        entry.main()
    assert exit_.value.code == 0
    assert "inspect" in capsys.readouterr().out


def half_mlp() -> nn.Module:
    return small_mlp().to(torch.bfloat16)


def test_inspect_runs_a_half_precision_model_on_inputs_of_its_dtype():
    """The example input was float32 whatever the model: a bfloat16 model failed ("mat1 and
    mat2 must have the same dtype")."""
    result = cli.invoke(app, ["inspect", "test_cli_audit:half_mlp", "--input-shape", "1,5"])
    assert result.exit_code == 0, result.output
    assert "16 generators (16 neuron)" in result.output
