"""Second audit of the checkpoint path (``gaugefix balance``, ``gaugefix.checkpoint``,
``gaugefix.files``): a tiny GPT-2 with tied embeddings in every dtype and both formats, written
over its own input; aliased modules; torch files of views into one storage; values that would
overflow or underflow their dtype; outputs moved beyond the dtype's precision; failures while
the output is written; output names near the file system's limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import gaugefix
import gaugefix.files
from faults import listing
from gaugefix.checkpoint import balance_state_dict, read_state_dict
from gaugefix.cli import app
from gaugefix.files import OutputError, write_bytes

transformers = pytest.importorskip("transformers")

cli = CliRunner()
HERE = "test_checkpoint_audit2"
VOCAB, IDS = 40, "1,8"
NAME_MAX = 255  # the longest file name Linux file systems take, in bytes
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def gpt2() -> nn.Module:
    """A tiny GPT-2 (2 layers, width 32) whose output layer is tied to the token embedding."""
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=VOCAB, use_cache=False,
        activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class Reused(nn.Module):
    """A ReLU MLP whose middle layer is registered twice (``l`` and ``alias``), applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.l, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.alias = self.l

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l(torch.relu(self.inp(x))))
        return self.out(torch.relu(self.alias(h)))


def fan_out() -> nn.Module:
    """One hidden ReLU unit read by 100 outputs."""
    return nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 100))


def chain() -> nn.Module:
    """``x -> w2 relu(w1 x)``, one unit, no biases."""
    return nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False))


def cancelling() -> nn.Module:
    """Two ReLU units whose contributions nearly cancel (weights set by the test)."""
    return nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))


def _balance(model: str, src: Path, out: Path, *inputs: str):
    args = ["balance", "--model", f"{HERE}:{model}", "--weights", str(src), "--out", str(out)]
    return cli.invoke(app, [*args, *inputs])


def _refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.output


def _gauged(make, x: torch.Tensor, scale: float = 1.5) -> dict[str, torch.Tensor]:
    """``make()``'s float64 state dict moved along its orbit (unbalanced, the same function)."""
    torch.manual_seed(0)
    model = make().double().eval()
    gaugefix.random_gauge_(
        model, gaugefix.discover(model, x), scale, torch.Generator().manual_seed(1)
    )
    return model.state_dict()


def _relative_change(make, a: dict, b: dict, x: torch.Tensor) -> float:
    """``max |f_b(x) - f_a(x)| / max |f_a(x)|`` in float64 (logits for a language model)."""
    outputs = []
    for tensors in (a, b):
        model = make().double().eval()
        model.load_state_dict({k: v.double() for k, v in tensors.items()}, strict=False)
        with torch.no_grad():
            out = model(x)
        outputs.append(out.logits if hasattr(out, "logits") else out)
    return float((outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max())


def _cast(name: str, t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` in ``dtype``; ``mixed``: norms and positions float32, layer 0 float16, the rest
    bfloat16."""
    if dtype != "mixed":
        return t.to(DTYPES[dtype])
    if ".ln_" in name or "ln_f" in name or "wpe" in name:
        return t.float()
    return t.half() if ".h.0." in name else t.bfloat16()


# -- 1. GPT-2's tied embedding, every dtype, both formats, written over its input ---------------


@pytest.mark.parametrize("dtype", [*DTYPES, "mixed"])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_tied_gpt2_balanced_over_its_own_file_keeps_names_dtypes_ties_and_function(
    tmp_path, fmt, dtype
):
    """``--out`` the ``--weights`` file: the names (in order for torch), dtypes and the tie
    (lm_head left out of safetensors, one storage in torch) are the input's; on fresh token ids
    the logits keep float64 to 1e-12 and the other dtypes to their rounding."""
    ids = torch.randint(VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    state = {k: _cast(k, v, dtype) for k, v in _gauged(gpt2, ids).items()}
    path = tmp_path / "weights.bin"
    if fmt == "safetensors":
        del state["lm_head.weight"]
        save_file(state, path)
    else:
        state["lm_head.weight"] = state["transformer.wte.weight"]
        torch.save(state, path)
    result = _balance("gpt2", path, path, "--input-ids", IDS, "--vocab", str(VOCAB))
    assert result.exit_code == 0, result.output
    written = read_state_dict(path)
    assert written.format == fmt
    order = list if fmt == "torch" else sorted  # safetensors keeps names sorted
    assert order(written.tensors) == order(state)
    dtypes = {k: v.dtype for k, v in state.items()}
    assert {k: v.dtype for k, v in written.tensors.items()} == dtypes
    if fmt == "torch":
        tied = written.tensors["lm_head.weight"], written.tensors["transformer.wte.weight"]
        assert tied[0].untyped_storage().data_ptr() == tied[1].untyped_storage().data_ptr()
    assert sum(not torch.equal(written.tensors[k], state[k]) for k in state) > 10  # it moved
    fresh = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    coarsest = max((t.dtype for t in state.values()), key=lambda d: torch.finfo(d).eps)
    bound = 1e-12 if coarsest == torch.float64 else 20 * torch.finfo(coarsest).eps
    assert _relative_change(gpt2, state, written.tensors, fresh) <= bound


# -- 2. aliased modules and torch files of views into one storage -------------------------------


@pytest.mark.parametrize("both", [True, False], ids=["both-names", "one-name"])
def test_an_aliased_module_is_balanced_once_under_the_files_names(both):
    """A module registered under two names: a file with both (one storage) gets both back in
    one storage; a file with one gets that one alone. The function holds to 1e-12."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = _gauged(Reused, x, 2.0)
    if not both:
        state = {k: v for k, v in state.items() if not k.startswith("alias.")}
    returned, report = balance_state_dict(Reused(), state, x)
    assert report.within_tolerance and report.before["mu_rel_max"] > 0.5
    assert list(returned) == list(state) and report.after["mu_rel_max"] < 1e-9
    if both:
        assert returned["l.weight"] is returned["alias.weight"]
    fresh = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert _relative_change(Reused, state, returned, fresh) <= 1e-12


def test_aliased_names_in_two_dtypes_are_refused_when_balancing_would_untie_them(tmp_path):
    """``l`` in float32 and ``alias`` (the same module) in float16, equal in the file: rounded
    to the two dtypes the balanced values differ, and loading would keep the later."""
    state = {k: v.half().float() for k, v in Reused().state_dict().items()}
    state["alias.weight"], state["alias.bias"] = state["l.weight"].half(), state["l.bias"].half()
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    before = listing(tmp_path)
    _refused(_balance("Reused", path, path, "--input-shape", "3,4"), "would break a tie")
    assert listing(tmp_path) == before


def test_a_torch_file_of_transposed_views_into_one_storage(tmp_path):
    """Every tensor a view into one flat float32 storage, the weights transposed (strides
    (1, n)): the balanced file holds each tensor in its own dtype and shape, and the function."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = _gauged(mlp, x, 2.0)
    flat = torch.empty(sum(v.numel() for v in state.values()))
    views, start = {}, 0
    for name, t in state.items():
        chunk = flat[start : start + t.numel()]
        views[name] = chunk.view(t.shape[::-1]).t() if t.dim() == 2 else chunk.view(t.shape)
        views[name].copy_(t)
        start += t.numel()
    assert not views["2.weight"].is_contiguous() and views["2.bias"].storage_offset() > 0
    src, out = tmp_path / "views.pt", tmp_path / "out.pt"
    torch.save(views, src)
    result = _balance("mlp", src, out, "--input-shape", "3,4")
    assert result.exit_code == 0, result.output
    written = read_state_dict(out).tensors
    assert {k: (v.dtype, v.shape) for k, v in written.items()} == {
        k: (torch.float32, v.shape) for k, v in state.items()
    }
    fresh = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert _relative_change(mlp, views, written, fresh) <= 20 * torch.finfo(torch.float32).eps


def deep() -> nn.Module:
    """A ReLU MLP with two hidden 6 x 6 layers (weights of one shape, not tied)."""
    layers = [nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(6, 2))


def test_one_tensor_under_two_names_the_model_keeps_apart_is_written_as_two():
    """A torch file holding one tensor for ``2.weight`` and ``4.weight`` (equal there, separate
    in the model): balancing moves them apart, and each is written with its own values."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = _gauged(deep, x, 2.0)
    state["4.weight"] = state["2.weight"]
    returned, report = balance_state_dict(deep(), state, x)
    assert report.within_tolerance and report.after["mu_rel_max"] < 1e-9
    assert not torch.equal(returned["2.weight"], returned["4.weight"])
    fresh = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert _relative_change(deep, state, returned, fresh) <= 1e-12


# -- 3. values out of their dtype's range, outputs beyond its precision ------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("where", ["same", "new-directory"])
def test_a_balanced_weight_that_overflows_float16_is_refused_and_no_file_changes(
    tmp_path, fmt, where
):
    """A unit read by 100 weights of 60000: balanced, its incoming weight is 60000 sqrt(10),
    beyond float16. Nothing is written, no directory made, every file byte for byte as it was."""
    model = fan_out()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[60000.0, 0.0]]))
        model[2].weight.fill_(60000.0)
    state = {k: v.half() for k, v in model.state_dict().items()}
    path = tmp_path / "weights.bin"
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    out = path if where == "same" else tmp_path / "made" / "out.bin"
    before = listing(tmp_path)
    result = _balance("fan_out", path, out, "--input-shape", "3,2")
    _refused(result, "balanced 0.weight does not fit in torch.float16 (overflow to inf)")
    assert listing(tmp_path) == before and not (tmp_path / "made").exists()


def test_a_balanced_weight_that_underflows_float16_is_refused_and_no_file_changes(tmp_path):
    """``w1 = 1e-16`` (float32) and ``w2 = 1`` (float16): balanced, both are 1e-8, which is 0 in
    float16, and the output would be 0."""
    state = {"0.weight": torch.tensor([[1e-16]]), "2.weight": torch.tensor([[1.0]]).half()}
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    before = listing(tmp_path)
    result = _balance("chain", path, path, "--input-shape", "1,1")
    _refused(result, "the balanced weights in torch.float16 change the outputs by 1 x max")
    assert listing(tmp_path) == before


def test_cancelling_units_moved_beyond_bfloat16_precision_are_refused(tmp_path):
    """``y = 1.3 * 0.77 x - 0.7 * 1.43 x`` in bfloat16 is ``-0.0017 x``: balanced (every weight
    1 in bfloat16) it is 0, a change of 100% of the output; refused, the input untouched."""
    state = {
        "0.weight": torch.tensor([[1.3], [0.7]], dtype=torch.bfloat16),
        "2.weight": torch.tensor([[1 / 1.3, -1 / 0.7]], dtype=torch.bfloat16),
    }
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    before = listing(tmp_path)
    result = _balance("cancelling", path, path, "--input-shape", "1,1")
    _refused(result, "in torch.bfloat16 change the outputs by 1 x max |output|")
    assert "more than 0.088; nothing written" in result.stderr
    assert listing(tmp_path) == before


def test_a_bfloat16_weight_its_rounding_leaves_in_place_sets_the_tolerance():
    """``w1 = 1`` (bfloat16) and ``w2 = 1.004`` (float32): balanced in float64 both are 1.002;
    in bfloat16 ``w1`` rounds back to 1, so the written pair changes the output by 0.2%, within
    bfloat16's precision (the file's ``w1`` holds no more). The tolerance was float32's (the
    coarsest dtype whose rounded value changed) and the correct balancing was refused."""
    state = {"0.weight": torch.ones(1, 1).bfloat16(), "2.weight": torch.tensor([[1.004]])}
    returned, report = balance_state_dict(chain(), state, torch.ones(1, 1))
    assert torch.equal(returned["0.weight"], state["0.weight"])
    assert report.output_relative == pytest.approx(0.002, rel=0.01)
    assert report.dtype == torch.bfloat16 and report.within_tolerance


# -- 4. failures while the output is written, and long names ------------------------------------


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failure_after_the_temporary_file_is_written_leaves_the_target(
    tmp_path, monkeypatch, step
):
    """``fsync`` or the rename failing (an I/O error): one line naming OUT, OUT byte for byte
    as it was, no temporary file left."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    src, out = tmp_path / "weights.pt", tmp_path / "out.pt"
    torch.save({k: v.float() for k, v in _gauged(mlp, x).items()}, src)
    out.write_bytes(b"the previous output")
    before = listing(tmp_path)

    def fail(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(gaugefix.files.os, step, fail)
    result = _balance("mlp", src, out, "--input-shape", "3,4")
    _refused(result, f"cannot write {out}: Input/output error")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("length", [NAME_MAX - 13, NAME_MAX])
@pytest.mark.parametrize("char", ["a", "\N{SNOWMAN}"])
def test_an_output_name_the_file_system_takes_is_written(tmp_path, length, char):
    """A name of up to 255 bytes is a valid file name; the temporary file beside it, named
    after it, must not exceed that limit (a 242-byte name failed: File name too long)."""
    name = char * (length // len(char.encode()))
    write_bytes(tmp_path / name, b"complete")
    assert listing(tmp_path) == {name: b"complete"}


def test_a_name_too_long_for_the_file_system_is_one_output_error(tmp_path):
    with pytest.raises(OutputError, match="File name too long"):
        write_bytes(tmp_path / ("a" * (NAME_MAX + 1)), b"never")
    assert listing(tmp_path) == {}


def test_the_command_line_keeps_an_output_name_of_the_longest_length(tmp_path):
    """``balance --out`` with a 255-byte name writes it, as ``open`` would."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    src, out = tmp_path / "weights.pt", tmp_path / ("o" * NAME_MAX)
    torch.save({k: v.float() for k, v in _gauged(mlp, x).items()}, src)
    result = _balance("mlp", src, out, "--input-shape", "3,4")
    assert result.exit_code == 0, result.output
    assert set(os.listdir(tmp_path)) == {src.name, out.name}
