"""``gaugefix balance`` (hard gauge fixing of a saved state dict) and token-id example inputs."""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import gaugefix
from faults import full_disk, listing
from gaugefix.checkpoint import (
    CheckpointBalance,
    CheckpointError,
    balance_state_dict,
    read_state_dict,
)
from gaugefix.cli import app
from gaugefix.zoo import cnn, mlp

cli = CliRunner()

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def gauged(make, shape: tuple[int, ...], scale: float = 1.5, vocab: int | None = None):
    """``make()`` in float64 moved along its orbit by a random gauge of log-scale ``scale``
    (unbalanced), discovered on normal inputs of ``shape`` (token ids below ``vocab``)."""
    torch.manual_seed(0)
    model = make().to(torch.float64)
    x = torch.randn(shape, dtype=torch.float64) if vocab is None else torch.randint(vocab, shape)
    structure = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, structure, scale, torch.Generator().manual_seed(1))
    return model


class TokenModel(nn.Module):
    """Token ids -> a tied embedding, a ReLU MLP in a residual, logits by the same embedding."""

    def __init__(self, vocab: int = 11, dim: int = 6, hidden: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.down(F.relu(self.up(x)))
        return self.head(x)


class Softplus(nn.Module):
    """Not positively homogeneous; the test below registers a wrong rule that says it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


def wrong_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), Softplus(), nn.Linear(6, 2))


def failing_factory() -> nn.Module:
    raise RuntimeError("no weights for you")


def _balance(*args: str):
    return cli.invoke(app, ["balance", *args])


def _save(tensors: dict[str, torch.Tensor], path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(tensors, str(path), metadata={"origin": "test"})
    else:
        torch.save(tensors, path)


def _function(model: nn.Module, tensors: dict[str, torch.Tensor], x: torch.Tensor):
    model = model.to(torch.float64)
    model.load_state_dict({k: v.to(torch.float64) for k, v in tensors.items()}, strict=False)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_balance_writes_the_same_format_and_dtype_and_keeps_the_function(tmp_path, fmt, dtype):
    model = gauged(cnn, (1, 3, 16, 16))
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    _save(state, src, fmt)
    result = _balance("--model", "cnn", "--weights", str(src), "--out", str(out))
    assert result.exit_code == 0, result.output
    written = read_state_dict(out)
    assert written.format == fmt
    assert set(written.tensors) == set(state)
    if fmt == "torch":
        assert list(written.tensors) == list(state)  # the order too
    assert all(written.tensors[k].dtype == dtype for k in state)
    if fmt == "safetensors":
        with safe_open(out, "pt") as f:
            assert f.metadata() == {"origin": "test"}
    assert torch.equal(written.tensors["9.bias"], state["9.bias"])  # no gauge touches it
    # balanced: the imbalance left is the rounding to the file's dtype
    structure = gaugefix.discover(cnn().double(), torch.randn(1, 3, 16, 16, dtype=torch.float64))
    stats = {k: v.to(torch.float64) for k, v in written.tensors.items()}
    eps = torch.finfo(dtype).eps
    assert gaugefix.imbalance_stats(stats, structure)["mu_rel_max"] <= max(50 * eps, 1e-10)
    before = gaugefix.imbalance_stats({k: v.double() for k, v in state.items()}, structure)
    assert before["mu_rel_max"] > 0.5
    # the function is kept on fresh inputs to the rounding of the file's dtype
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y, y_balanced = _function(cnn(), state, x), _function(cnn(), written.tensors, x)
    rel = float((y_balanced - y).abs().max() / y.abs().max())
    assert rel <= (1e-12 if dtype == torch.float64 else 20 * eps)
    assert f"written to {out} ({fmt}, {str(dtype).removeprefix('torch.')})" in result.output


def test_balance_in_float64_is_balance_():
    model = gauged(lambda: mlp((5, 7, 9, 3)), (1, 5), scale=2.0)
    state = model.state_dict()
    written, report = balance_state_dict(mlp((5, 7, 9, 3)), state, torch.randn(1, 5))
    x = torch.randn(1, 5, dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    gaugefix.balance_(model, structure)
    for name, t in model.state_dict().items():
        assert torch.equal(written[name], t), name
    assert report.num_generators == 16
    assert report.after["mu_rel_max"] <= 1e-10 < 0.5 < report.before["mu_rel_max"]
    assert report.exact_change <= 1e-14 * report.output_scale
    assert report.output_change == report.exact_change and report.dtype == torch.float64
    assert report.within_tolerance
    assert math.isclose(report.after["norm_sq"], report.result.norm_sq_after, rel_tol=1e-12)


@pytest.mark.parametrize(
    "kwargs", [{"alpha": 5.0}, {"calibration": torch.randn(4, 5)}, {"objective": "nrom"}]
)
def test_arguments_the_objective_does_not_take_are_refused(kwargs):
    """As ``equalize_`` refuses them: ``alpha`` outside [0, 1] and a calibration batch with
    ``"norm"`` too (they used to be ignored), and an unknown objective."""
    state = mlp((5, 7, 3)).state_dict()
    with pytest.raises(
        CheckpointError, match="alpha is the exponent|calibration|unknown objective"
    ):
        balance_state_dict(mlp((5, 7, 3)), state, torch.randn(1, 5), **kwargs)


def test_token_ids_tied_weights_left_out_of_a_safetensors_file(tmp_path):
    model = gauged(TokenModel, (2, 5), vocab=11)
    inspect = cli.invoke(app, ["inspect", "test_checkpoint:TokenModel", "--input-ids", "2,5"])
    assert inspect.exit_code == 2 and "--input-ids and --vocab go together" in inspect.output
    inspect = cli.invoke(
        app, ["inspect", "test_checkpoint:TokenModel", "--input-ids", "2,5", "--vocab", "11"]
    )
    assert inspect.exit_code == 0, inspect.output
    ids = torch.randint(11, (2, 5))
    n = gaugefix.discover(TokenModel(), ids).num_generators
    assert n >= 8 and f"{n} generators" in inspect.output

    state = {k: v.float() for k, v in model.state_dict().items() if k != "head.weight"}
    src, out = tmp_path / "model.safetensors", tmp_path / "balanced.safetensors"
    save_file(state, str(src))
    result = _balance(
        "--model", "test_checkpoint:TokenModel", "--weights", str(src), "--out", str(out),
        "--input-ids", "3,7", "--vocab", "11",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert set(written) == set(state)  # the tied head stays left out
    fresh = TokenModel().double()
    fresh.load_state_dict({**written, "head.weight": written["emb.weight"]})
    structure = gaugefix.discover(fresh, ids)
    assert gaugefix.imbalance_stats(fresh, structure)["mu_rel_max"] <= 1e-5
    ids = torch.randint(11, (4, 9))
    y = _function(TokenModel(), {**state, "head.weight": state["emb.weight"]}, ids)
    assert float((fresh(ids).detach() - y).abs().max() / y.abs().max()) <= 1e-6


def test_tied_weights_that_differ_in_the_file_are_refused(tmp_path):
    state = {k: v.clone() for k, v in TokenModel().state_dict().items()}
    state["head.weight"] += 1.0  # the model ties it to emb.weight
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(state, src)
    result = _balance(
        "--model", "test_checkpoint:TokenModel", "--weights", str(src), "--out", str(out),
        "--input-ids", "2,5", "--vocab", "11",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "emb.weight and head.weight differ, but the model ties them" in result.output
    assert not out.exists()


def _state_file(tmp_path, tensors=None, fmt="torch"):
    path = tmp_path / ("in.safetensors" if fmt == "safetensors" else "in.pt")
    _save(tensors if tensors is not None else mlp().state_dict(), path, fmt)
    return path


def _broken(tmp_path, case):
    state = mlp().state_dict()
    if case == "missing key":
        del state["2.bias"]
    elif case == "unexpected key":
        state["extra"] = torch.zeros(2)
    elif case == "shape":
        state["2.bias"] = torch.zeros(33)
    elif case == "nan":
        state["2.weight"][3, 4] = float("nan")
    elif case == "integer weight":
        state["0.bias"] = torch.zeros(32, dtype=torch.int64)
    return _state_file(tmp_path, state, "safetensors")


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing key", "the weights do not fit the model: 2.bias missing"),
        ("unexpected key", "the weights do not fit the model: extra not in the model"),
        ("shape", "2.bias has shape (33,), the model's (32,)"),
        ("nan", "2.weight holds 1 non-finite entries"),
        ("integer weight", "0.bias is torch.int64 where the model has a floating-point tensor"),
    ],
)
def test_weights_that_do_not_fit_are_refused(tmp_path, case, message):
    src, out = _broken(tmp_path, case), tmp_path / "out.safetensors"
    before = src.read_bytes()
    result = _balance("--model", "mlp", "--weights", str(src), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and src.read_bytes() == before


def test_bad_files_and_factories_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    nested = tmp_path / "nested.pt"
    torch.save({"model": mlp().state_dict(), "step": 3}, nested)
    good = _state_file(tmp_path)
    out = tmp_path / "out.pt"
    for args, message in (
        (["--model", "mlp", "--weights", str(tmp_path / "no.pt")], "no weights file"),
        (["--model", "mlp", "--weights", str(garbage)], "cannot read"),
        (["--model", "mlp", "--weights", str(listed)], "holds a list, not a state dict"),
        (["--model", "mlp", "--weights", str(nested)], "holds a dict, not a state dict"),
        (
            ["--model", "test_checkpoint:failing_factory", "--weights", str(good)],
            "calling 'test_checkpoint:failing_factory' failed (RuntimeError: no weights for you)",
        ),
        (["--model", "gaugefix.zoo:cnn", "--weights", str(good)], "--input-shape is required"),
        (
            ["--model", "mlp", "--weights", str(good), "--input-shape", "1,4"],
            "failed in module",
        ),
        (
            ["--model", "mlp", "--weights", str(good), "--input-shape", "1,16", "--input-ids",
             "1,16", "--vocab", "3"],
            "at most one of --input-shape and --input-ids",
        ),
    ):  # fmt: skip
        result = _balance(*args, "--out", str(out))
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists()
    result = _balance("--model", "mlp", "--weights", str(good), "--out", str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in result.output


def test_a_wrong_symmetry_is_caught_and_nothing_written(tmp_path):
    # A user rule that wrongly calls softplus positively homogeneous: balancing would change the
    # function, and the output check refuses to write.
    torch.manual_seed(0)
    model = wrong_model()
    with torch.no_grad():
        model[0].weight.mul_(4.0)  # unbalanced, so balancing moves it
    src, out = _state_file(tmp_path, model.state_dict()), tmp_path / "out.pt"
    gaugefix.register_rule(Softplus, gaugefix.rules.elementwise)
    try:
        result = _balance(
            "--model", "test_checkpoint:wrong_model", "--weights", str(src), "--out", str(out),
            "--input-shape", "3,4",
        )  # fmt: skip
    finally:
        gaugefix.unregister_rule(Softplus)
    assert result.exit_code == 2, result.output
    assert "the discovered symmetry does not hold for this model; nothing written" in result.output
    assert not out.exists()


def test_outputs_beyond_the_dtype_tolerance_are_not_written(tmp_path, monkeypatch):
    src, out = _state_file(tmp_path, gauged(mlp, (1, 16)).float().state_dict()), tmp_path / "o.pt"
    real = CheckpointBalance.relative_tolerance
    monkeypatch.setattr(  # float32 rounding now exceeds float32's tolerance; float64 keeps its
        CheckpointBalance,
        "relative_tolerance",
        staticmethod(lambda dtype: 0.0 if dtype == torch.float32 else real(dtype)),
    )
    result = _balance("--model", "mlp", "--weights", str(src), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "the balanced weights in torch.float32 change the outputs by" in result.output
    assert not out.exists()
    assert "largest output change on the example input" in result.output


def _one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_balance_refuses_a_directory_fifo_or_device_as_out_and_changes_nothing(tmp_path):
    src = _state_file(tmp_path)
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "null").symlink_to(os.devnull)  # a device, through a link (never /dev/null itself)
    before = listing(tmp_path)
    for name, why in (
        ("dir", "it is a directory"),
        ("fifo", "it is not a regular file"),
        ("null", "it is not a regular file"),
    ):
        result = _balance("--model", "mlp", "--weights", str(src), "--out", str(tmp_path / name))
        _one_line_error(result, f"cannot write {tmp_path / name}: {why}")
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode)
    assert os.readlink(tmp_path / "null") == os.devnull and (tmp_path / "dir").is_dir()
    assert listing(tmp_path) == before


@pytest.mark.parametrize("existing", [False, True])
def test_balance_writes_through_a_symlink_with_the_umask_permissions(tmp_path, existing):
    src = _state_file(tmp_path, gauged(mlp, (1, 16)).state_dict(), "safetensors")
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    target = tmp_path / "real" / "balanced.safetensors"
    if existing:
        target.write_bytes(b"old")
        target.chmod(0o600)
    link = tmp_path / "links" / "out.safetensors"
    link.symlink_to(target)
    umask = os.umask(0o027)
    try:
        result = _balance("--model", "mlp", "--weights", str(src), "--out", str(link))
    finally:
        os.umask(umask)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert set(load_file(target)) == set(mlp().state_dict())
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["in.safetensors", "real", "links", "balanced.safetensors", "out.safetensors"]
    )


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_balance_on_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch, fmt):
    src = _state_file(tmp_path, gauged(mlp, (1, 16)).state_dict(), fmt)
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out.bin"
    out.write_bytes(b"the previous weights")
    full_disk(monkeypatch, disk)
    result = _balance("--model", "mlp", "--weights", str(src), "--out", str(out))
    _one_line_error(result, f"cannot write {out}: No space left on device")
    assert listing(disk) == {"out.bin": b"the previous weights"}
