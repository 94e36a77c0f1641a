"""``gaugefix balance`` and ``gaugefix inspect`` on Hugging Face mixtures of experts (tiny Mixtral,
Qwen2-MoE and OLMoE configs, random weights).

Transformers 5 runs the experts with ``torch._grouped_mm`` by default, which has no float64
kernel: ``balance`` works on a float64 copy, so it failed in the experts. The copy now runs them
with ``batched_mm`` (the same experts, in ``bmm``), the original model and its implementation
untouched. The ``eager`` experts loop reads the routing into Python (``if expert_idx ==
num_experts``): refused unless ``--allow-value-dependent``, and with it the output check on the
example input still refuses a symmetry that does not hold.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import gaugefix
from gaugefix.checkpoint import balance_state_dict, read_state_dict
from gaugefix.cli import app
from gaugefix.precision import Float64Throughout

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

cli = CliRunner()
HERE = "test_cli_moe"
VOCAB, IDS = 40, "2,8"
COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False}
MOE = {
    "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 32, "num_experts_per_tok": 2,
    "moe_intermediate_size": 8,
}  # fmt: skip
TOL = 1e-10
# float32 weights: each logit to a few float32 roundings of the largest (the command's own
# per-output bound is sqrt(eps_float32) = 3.5e-4)
F32_TOL = 1e-5


def mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**COMMON, **MOE, num_local_experts=4)
    return transformers.MixtralForCausalLM(config)


def mixtral_eager() -> nn.Module:
    model = mixtral()
    model.set_experts_implementation("eager")
    return model


def qwen2_moe() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        **COMMON, **MOE, num_experts=4, shared_expert_intermediate_size=12
    )
    return transformers.Qwen2MoeForCausalLM(config)


def olmoe() -> nn.Module:
    torch.manual_seed(0)
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**COMMON, **MOE, num_experts=4))


class Broken(nn.Module):
    """The eager Mixtral whose logits are multiplied by ``max |model.norm.weight|``, taken as a
    number when weights are loaded: the forward reads no weight for it, so discovery (which needs
    ``--allow-value-dependent`` for the experts loop) takes the final norm's gain for a symmetry,
    and it is not one."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = mixtral_eager()
        self.scale = 1.0
        self.register_load_state_dict_post_hook(Broken.loaded)

    def loaded(self, incompatible: object) -> None:
        self.scale = float(self.inner.model.norm.weight.detach().abs().max())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids).logits * self.scale


def broken() -> nn.Module:
    return Broken()


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def _gauged(make, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``make()``'s weights moved along their orbit (discovered in float64, batched experts),
    in ``dtype``."""
    model = make().double().eval()
    model.set_experts_implementation("batched_mm")
    structure = gaugefix.discover(model, _ids())
    gaugefix.random_gauge_(model, structure, 1.0, torch.Generator().manual_seed(1))
    return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}


def _logits(make, tensors: dict[str, torch.Tensor], dtype=torch.float64) -> torch.Tensor:
    """The logits of ``make()`` in ``dtype`` with ``tensors``, its experts implementation kept
    (float64 has no grouped_mm kernel: batched_mm then); in float64 throughout (the router's
    float32 softmax too) when ``dtype`` is float64."""
    model = make().to(dtype).eval()
    if dtype == torch.float64 and model.config._experts_implementation == "grouped_mm":
        model.set_experts_implementation("batched_mm")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    with torch.no_grad(), Float64Throughout() if dtype == torch.float64 else nullcontext():
        return model(_ids()).logits.double()


def _balance(model: str, src: Path, out: Path, *extra: str):
    args = ["balance", "--model", f"{HERE}:{model}", "--weights", str(src), "--out", str(out)]
    return cli.invoke(app, [*args, "--input-ids", IDS, "--vocab", str(VOCAB), *extra])


def _one_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("make", [mixtral, qwen2_moe, olmoe])
def test_a_grouped_mm_mixture_is_balanced_in_float64(make):
    """The default (grouped_mm) experts have no float64 kernel: balancing failed in them. Now
    the float64 copy uses batched_mm, the function is kept to 1e-10, the norm goes down, and
    the caller's model keeps its implementation."""
    model = make()
    assert model.config._experts_implementation == "grouped_mm"
    state = _gauged(make, torch.float64)
    returned, report = balance_state_dict(model, state, _ids())
    assert model.config._experts_implementation == "grouped_mm"
    assert report.exact_relative < TOL and report.within_tolerance
    assert report.after["norm_sq"] < report.before["norm_sq"] - 1.0
    before, after = _logits(make, state), _logits(make, returned)
    assert float((after - before).abs().max() / before.abs().max()) < TOL


def test_the_command_balances_a_float32_mixtral(tmp_path):
    """``gaugefix balance`` on a float32 Mixtral state dict: written, in float32, the logits of
    the grouped_mm model (in float64) kept to float32 rounding, the experts moved."""
    src, out = tmp_path / "w.safetensors", tmp_path / "b.safetensors"
    state = _gauged(mixtral, torch.float32)
    save_file(state, src)
    result = _balance("mixtral", src, out)
    assert result.exit_code == 0, result.output
    assert (
        "balanced weights written to" in result.stdout and "(safetensors, float32)" in result.stdout
    )
    returned = load_file(out)
    assert {v.dtype for v in returned.values()} == {torch.float32}
    name = "model.layers.0.mlp.experts.down_proj"
    assert float((returned[name] - state[name]).abs().max()) > 1e-2
    for dtype in (torch.float64, torch.float32):  # batched_mm; and grouped_mm, as it runs
        before, after = _logits(mixtral, state, dtype), _logits(mixtral, returned, dtype)
        assert float((after - before).abs().max() / before.abs().max()) < F32_TOL


def test_the_eager_experts_loop_needs_allow_value_dependent(tmp_path):
    """The eager experts loop reads the routing into Python: one line naming the option,
    nothing written; with ``--allow-value-dependent`` it is balanced, the function kept."""
    src, out = tmp_path / "w.safetensors", tmp_path / "b.safetensors"
    state = _gauged(mixtral, torch.float64)
    save_file(state, src)
    original = src.read_bytes()
    _one_line(_balance("mixtral_eager", src, out), "--allow-value-dependent")
    assert not out.exists() and src.read_bytes() == original
    result = _balance("mixtral_eager", src, out, "--allow-value-dependent")
    assert result.exit_code == 0, result.output
    before, after = _logits(mixtral_eager, state), _logits(mixtral_eager, load_file(out))
    assert float((after - before).abs().max() / before.abs().max()) < TOL
    assert src.read_bytes() == original


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_broken_symmetry_is_refused_with_allow_value_dependent(tmp_path, dtype):
    """With ``--allow-value-dependent`` discovery finds the final norm's gain, which is no
    symmetry of :class:`Broken`: the output check on the example input (its logits move by
    0.9 x their largest) refuses it, nothing written."""
    src, out = tmp_path / "w.safetensors", tmp_path / "b.safetensors"
    state = {f"inner.{k}": v for k, v in _gauged(mixtral, dtype).items()}
    save_file(state, src)
    original = src.read_bytes()
    _one_line(_balance("broken", src, out), "--allow-value-dependent")
    result = _balance("broken", src, out, "--allow-value-dependent")
    _one_line(result, "change the outputs by ")
    assert result.stderr.rstrip().endswith("; nothing written")
    assert not out.exists() and src.read_bytes() == original


def test_a_save_pretrained_checkpoint_is_written_in_its_layout(tmp_path):
    """``save_pretrained`` writes the experts in the checkpoint layout (one ``w1``/``w2``/``w3``
    per expert), not the model's fused tensors: it was refused; now transformers' conversion
    takes it to the model's layout and back, and the file's names are written
    (tests/test_cli_moe2.py loads the result)."""
    mixtral().save_pretrained(tmp_path / "ckpt")
    src, out = tmp_path / "ckpt" / "model.safetensors", tmp_path / "b.safetensors"
    original = src.read_bytes()
    result = _balance("mixtral", src, out)
    assert result.exit_code == 0, result.output
    assert sorted(load_file(out)) == sorted(load_file(src)) == sorted(read_state_dict(src).tensors)
    assert src.read_bytes() == original


@pytest.mark.parametrize("make", ["mixtral", "qwen2_moe", "olmoe", "mixtral_eager"])
def test_inspect_scale_groups_of_a_mixture(make):
    """``inspect --scale-groups`` lists the attention and final-norm groups of each family (the
    eager Mixtral with ``--allow-value-dependent`` only; without it, one line naming it)."""
    args = ["inspect", f"{HERE}:{make}", "--input-ids", IDS, "--vocab", str(VOCAB)]
    if make == "mixtral_eager":
        _one_line(cli.invoke(app, [*args, "--scale-groups"]), "--allow-value-dependent")
        args.append("--allow-value-dependent")
    result = cli.invoke(app, [*args, "--scale-groups"])
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)
    smooth = {g["smooth_layer"] for g in groups}
    assert {"model.layers.0.input_layernorm", "model.norm"} <= smooth
    assert "model.layers.0.self_attn.v_proj" in smooth
