"""``gaugefix balance`` on checkpoints written by ``save_pretrained`` (tiny Mixtral, Qwen2-MoE and
OLMoE configs; a dense Llama for contrast).

Transformers 5 keeps a mixture's experts fused in the model (``mlp.experts.gate_up_proj``,
``down_proj``) but saves them in the checkpoint layout (one ``w1``/``w2``/``w3``, or
``gate_proj``/``up_proj``/``down_proj``, per expert), converting at load and back at save. The
command converts such a file with transformers' own load-time conversion, balances, converts
back with its save-time reversal, and writes the file's names, dtypes and metadata, which
``from_pretrained`` loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import gaugefix
from gaugefix.checkpoint import CheckpointError, balance_state_dict
from gaugefix.cli import app

transformers = pytest.importorskip("transformers")
from test_cli_moe import COMMON, IDS, MOE, VOCAB, _ids, _one_line, mixtral, olmoe, qwen2_moe  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

cli = CliRunner()
HERE = "test_cli_moe2"
EXPERT = "model.layers.0.block_sparse_moe.experts.1.w1.weight"  # Mixtral's checkpoint layout
FUSED = "model.layers.0.mlp.experts.gate_up_proj"  # the model's
TOL = 1e-10
# float32 weights: the logits of the loaded balanced model against the original's, relative to
# their largest, to ten float32 roundings (eps = 1.2e-7; measured 0.7 to 2.1e-7)
F32_TOL = 10 * torch.finfo(torch.float32).eps


def llama() -> nn.Module:
    torch.manual_seed(0)
    keep = {
        k: v for k, v in MOE.items() if k not in ("num_experts_per_tok", "moe_intermediate_size")
    }
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, **keep))


def mixtral_tied() -> nn.Module:
    """Mixtral whose output layer is the embedding (``save_pretrained`` leaves it out)."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        **{**COMMON, "tie_word_embeddings": True}, **MOE, num_local_experts=4
    )
    return transformers.MixtralForCausalLM(config)


FACTORIES = {f.__name__: f for f in (mixtral, qwen2_moe, olmoe, llama, mixtral_tied)}


def _saved(name: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """``save_pretrained`` of ``name``'s model in ``dtype``, its weights moved along their orbit
    first (discovered in float64 with batched experts) so that balancing has work to do."""
    model = FACTORIES[name]().double().eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("batched_mm")
    gaugefix.random_gauge_(
        model, gaugefix.discover(model, _ids()), 1.0, torch.Generator().manual_seed(1)
    )
    model.to(dtype).save_pretrained(folder)
    return folder / "model.safetensors"


def _logits(folder: Path) -> torch.Tensor:
    """The logits of the model ``from_pretrained`` loads from ``folder``, in float64."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_ids()).logits.double()


def _balance(model: str, src: Path, out: Path, *extra: str):
    args = ["balance", "--model", f"{HERE}:{model}", "--weights", str(src), "--out", str(out)]
    return cli.invoke(app, [*args, "--input-ids", IDS, "--vocab", str(VOCAB), *extra])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "mixtral_tied"])
def test_a_save_pretrained_mixture_is_balanced_and_loads(tmp_path, name):
    """A float32 ``save_pretrained`` checkpoint is balanced and written in its own layout (the
    same names, dtypes and metadata); ``from_pretrained`` loads it, its logits are the
    original's to float32 rounding, and the experts moved."""
    src = _saved(name, tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "balanced")
    out = tmp_path / "balanced" / "model.safetensors"
    result = _balance(name, src, out)
    assert result.exit_code == 0, result.output
    given, written = load_file(src), load_file(out)
    assert sorted(written) == sorted(given)
    assert all(written[k].dtype == given[k].dtype == torch.float32 for k in given)
    with safe_open(src, "pt") as f, safe_open(out, "pt") as g:
        assert g.metadata() == f.metadata()
    expert = next(k for k in given if ".experts.1." in k)
    assert float((written[expert] - given[expert]).abs().max()) > 1e-2
    assert _relative(_logits(tmp_path / "balanced"), _logits(tmp_path / "ckpt")) < F32_TOL


def test_a_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    """A bfloat16 ``save_pretrained`` checkpoint is written back in bfloat16, in its layout."""
    src = _saved("mixtral", tmp_path / "ckpt", torch.bfloat16)
    out = tmp_path / "b.safetensors"
    result = _balance("mixtral", src, out)
    assert result.exit_code == 0, result.output
    assert "(safetensors, bfloat16)" in result.stdout
    given, written = load_file(src), load_file(out)
    assert sorted(written) == sorted(given)
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    assert not torch.equal(written[EXPERT], given[EXPERT])


def test_balance_state_dict_returns_the_checkpoint_layout(tmp_path):
    """From Python: the balanced tensors come back under the file's names, the function kept
    to 1e-10 in float64 (the model's own fused layout is balanced to the same weights)."""
    src = _saved("mixtral", tmp_path / "ckpt", torch.float64)
    given = load_file(src)
    returned, report = balance_state_dict(mixtral(), given, _ids())
    assert sorted(returned) == sorted(given) and report.exact_relative < TOL
    assert report.within_tolerance and report.after["norm_sq"] < report.before["norm_sq"] - 1.0
    fused = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    fused_returned, _ = balance_state_dict(mixtral(), fused.state_dict(), _ids())
    shutil.copytree(tmp_path / "ckpt", tmp_path / "balanced")
    save_file(returned, tmp_path / "balanced" / "model.safetensors", metadata={"format": "pt"})
    loaded = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path / "balanced", dtype=torch.float64
    ).state_dict()
    assert sorted(loaded) == sorted(fused_returned)
    for k, v in loaded.items():
        assert torch.equal(v, fused_returned[k]), k


def test_a_dense_save_pretrained_checkpoint_is_unchanged_in_layout(tmp_path):
    """A dense model's checkpoint has the model's names: balanced as before, same names."""
    src = _saved("llama", tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "balanced")
    out = tmp_path / "balanced" / "model.safetensors"
    result = _balance("llama", src, out)
    assert result.exit_code == 0, result.output
    assert sorted(load_file(out)) == sorted(load_file(src))
    assert _relative(_logits(tmp_path / "balanced"), _logits(tmp_path / "ckpt")) < F32_TOL


@pytest.mark.parametrize(
    "damage, message",
    [
        ("drop", "the weights do not fit the model"),
        ("shape", "the weights do not fit the model"),
        ("dtype", "does not give back"),
        ("extra", "not in the model"),
        ("nan", "holds 1 non-finite entries"),
    ],
)
def test_a_damaged_save_pretrained_checkpoint_is_refused(tmp_path, damage, message):
    """An expert left out, one of another shape, one of another dtype than its siblings (the
    fused tensor could not hold both), an unknown name or a NaN: one line, nothing written."""
    src = _saved("mixtral", tmp_path / "ckpt")
    state = load_file(src)
    if damage == "drop":
        del state[EXPERT]
    elif damage == "shape":
        state[EXPERT] = state[EXPERT][:-1].clone()
    elif damage == "dtype":
        state[EXPERT] = state[EXPERT].double()
    elif damage == "nan":
        state[EXPERT][0, 0] = torch.nan
    else:
        state["model.layers.0.block_sparse_moe.experts.9.w7.weight"] = state[EXPERT].clone()
    save_file(state, src, metadata={"format": "pt"})
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"old")
    original = src.read_bytes()
    _one_line(_balance("mixtral", src, out), message)
    assert out.read_bytes() == b"old" and src.read_bytes() == original


def test_a_checkpoint_of_a_wrapped_model_is_refused_with_how_to_save_it(tmp_path):
    """A module wrapping a transformers model gets no conversion: the checkpoint layout is
    refused in one line that says how to save a state dict the model loads."""
    src = _saved("mixtral", tmp_path / "ckpt")
    state = {f"inner.{k}": v for k, v in load_file(src).items()}
    save_file(state, src)
    original = src.read_bytes()
    _one_line(_balance("wrapped", src, tmp_path / "b.safetensors"), "state_dict()")
    assert not (tmp_path / "b.safetensors").exists() and src.read_bytes() == original


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = mixtral()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids).logits


def wrapped() -> nn.Module:
    return Wrapped()


def test_a_model_layout_file_for_a_mixture_is_balanced_as_before():
    """The model's own (fused) names are not converted: no CheckpointError, same names."""
    state = mixtral().double().state_dict()
    returned, report = balance_state_dict(mixtral(), state, _ids())
    assert sorted(returned) == sorted(state) and report.exact_relative < TOL
    with pytest.raises(CheckpointError, match="not in the model"):
        balance_state_dict(mixtral(), {**state, "nonsense.weight": state[FUSED]}, _ids())
