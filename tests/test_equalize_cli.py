"""``gaugefix balance --objective range|activation``: the orbit point of ``equalize_`` written in
the file's format and dtypes, the function kept; bad options are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import gaugefix
from gaugefix.checkpoint import read_state_dict
from gaugefix.cli import app
from gaugefix.zoo import cnn, mlp

cli = CliRunner()


def scrambled_state(make, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The float64 weights of ``make()`` moved off balance by a random gauge."""
    torch.manual_seed(0)
    model = make().to(torch.float64)
    structure = gaugefix.discover(model, torch.randn(shape, dtype=torch.float64))
    gaugefix.random_gauge_(model, structure, 1.5, torch.Generator().manual_seed(1))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def equalized(make, state, shape, objective: str, **kwargs) -> dict[str, torch.Tensor]:
    """What ``equalize_`` gives on a float64 model with ``state``."""
    model = make().to(torch.float64).eval()
    model.load_state_dict({k: v.double() for k, v in state.items()})
    structure = gaugefix.discover(model, torch.randn(shape, dtype=torch.float64))
    gaugefix.equalize_(model, structure, objective, **kwargs)
    return model.state_dict()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_range_writes_the_equalized_weights_in_the_file_dtype(tmp_path, dtype):
    state = {k: v.to(dtype) for k, v in scrambled_state(cnn, (1, 3, 16, 16)).items()}
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(state, str(src))
    args = ["balance", "--model", "cnn", "--weights", str(src), "--out", str(out)]
    result = cli.invoke(app, [*args, "--objective", "range"])
    assert result.exit_code == 0, result.output
    assert "range: residual max |delta_n|" in result.output
    written = read_state_dict(out).tensors
    expected = equalized(cnn, state, (1, 3, 16, 16), "range")
    for name, t in written.items():
        assert t.dtype == dtype and torch.equal(t, expected[name].to(dtype)), name


def test_activation_uses_the_calibration_file_and_alpha(tmp_path):
    shape = (1, 5)
    state = scrambled_state(small_mlp, shape)
    src, out, data = tmp_path / "in.pt", tmp_path / "out.pt", tmp_path / "calib.npz"
    torch.save(state, src)
    batch = np.random.default_rng(0).normal(size=(16, 5)) * np.arange(1, 6)
    np.savez(data, X=batch)
    args = ["balance", "--model", "test_equalize_cli:small_mlp", "--weights", str(src)]
    args += ["--out", str(out), "--input-shape", "1,5", "--objective", "activation"]
    result = cli.invoke(app, [*args, "--calibration", str(data), "--alpha", "0.7"])
    assert result.exit_code == 0, result.output
    written = read_state_dict(out).tensors
    calibration = torch.from_numpy(batch)
    expected = equalized(small_mlp, state, shape, "activation", calibration=calibration, alpha=0.7)
    for name, t in written.items():
        assert torch.equal(t, expected[name]), name


def small_mlp() -> torch.nn.Module:
    return mlp((5, 7, 9, 3))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--objective", "minmax"], "unknown --objective 'minmax'"),
        (["--objective", "range", "--calibration", "x.npz"], "only with --objective activation"),
        (["--objective", "activation", "--alpha", "1.5"], "alpha must be a number in [0, 1]"),
        (["--objective", "activation", "--calibration", "WRONG"], "calibration batch"),
        (["--objective", "activation", "--calibration", "MISSING"], "no array 'X'"),
        (["--objective", "activation", "--calibration", "TEXT"], "cannot read"),
        (["--objective", "norm", "--alpha", "2"], "alpha must be a number in [0, 1]"),
        (["--objective", "range", "--alpha", "nan"], "alpha must be a number in [0, 1]"),
    ],
)
def test_bad_options_are_one_line_errors_and_nothing_is_written(tmp_path, extra, message):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(scrambled_state(small_mlp, (1, 5)), src)
    np.savez(tmp_path / "wrong.npz", X=np.zeros((4, 6)))
    np.savez(tmp_path / "missing.npz", Y=np.zeros((4, 5)))
    np.savez(tmp_path / "text.npz", X=np.array([["a"] * 5] * 4))
    files = {name: str(tmp_path / f"{name.lower()}.npz") for name in ("WRONG", "MISSING", "TEXT")}
    extra = [files.get(a, a) for a in extra]
    args = ["balance", "--model", "test_equalize_cli:small_mlp", "--weights", str(src)]
    args += ["--out", str(out), "--input-shape", "1,5", *extra]
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
