"""The output check of ``balance_state_dict`` runs the float64 copy in float64 throughout.

A norm that computes in float32 (transformers' ``LlamaRMSNorm`` casts its input to float32 and
back) would otherwise limit the copy's outputs to float32 resolution, and a change of the function
smaller than a float32 rounding of the norm's input would not show in them at all.
"""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import gaugefix.checkpoint as checkpoint
from gaugefix.checkpoint import CheckpointBalance, balance_state_dict
from gaugefix.cli import app
from gaugefix.precision import Float64Throughout, float64_outputs

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

pytestmark = pytest.mark.usefixtures("single_thread")

HERE = "test_checkpoint_float64"
TOL64 = CheckpointBalance.relative_tolerance(torch.float64)
WIDTH = 8
EPS = 1e-6
TOKENS = 6
NUDGE = 1e-10  # a wrong rescaling far below float32's resolution (6e-8)


def normed() -> nn.Module:
    """``Linear -> LlamaRMSNorm -> Linear`` in float32, the norm's weight away from one and the
    last layer the identity (each output entry is one entry of the normalised vector, so that a
    change of one entry is not averaged away)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, WIDTH), LlamaRMSNorm(WIDTH, eps=EPS), nn.Linear(WIDTH, WIDTH)
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[2].weight.copy_(torch.eye(WIDTH))
        model[2].bias.zero_()
    return model


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _x() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, 5, dtype=torch.float64).reshape(1, 5)


def _ids() -> torch.Tensor:
    return torch.arange(TOKENS).reshape(1, TOKENS) % 32


def _float64(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in module.state_dict().items()}


def _hand(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``normed``'s function written out in float64: ``W2 (w * h / sqrt(mean h^2 + eps)) + b2``
    with ``h = W1 x + b1``."""
    h = x @ state["0.weight"].T + state["0.bias"]
    n = state["1.weight"] * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return n @ state["2.weight"].T + state["2.bias"]


def _hidden_moves(h: torch.Tensor) -> torch.Tensor:
    """For each entry of the norm's input ``h`` (one row), a move of it that keeps its float32
    rounding: to 0.45 of a float32 ulp past that rounding, on the side away from ``h_i`` (at
    least 2.7e-8 of ``|h_i|``)."""
    f = h.float()
    ulp = (torch.nextafter(f.abs(), torch.tensor(torch.inf)) - f.abs()).double()
    side = torch.where(f.double() >= h, 1.0, -1.0).double()
    return f.double() + side * 0.45 * ulp - h


def _largest_hidden_change(state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[int, float]:
    """The entry ``i`` of ``normed``'s first bias, and its move from :func:`_hidden_moves`, that
    changes the float64 output most relative to its largest entry."""
    h = (x @ state["0.weight"].T + state["0.bias"])[0]
    moves = _hidden_moves(h)
    before = _hand(state, x)
    changes = []
    for i in range(WIDTH):  # eight entries, in a test
        bias = state["0.bias"].clone()
        bias[i] += moves[i]
        after = _hand({**state, "0.bias": bias}, x)
        changes.append(float((after - before).abs().max() / before.abs().max()))
    i = max(range(WIDTH), key=changes.__getitem__)
    assert (h[i] + moves[i]).float() == h[i].float() and moves[i] != 0
    return i, float(moves[i])


def _wrong_bias(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Make the balancing step also move ``normed``'s first bias by a change that no float32
    rounding of the norm's input shows (a wrong symmetry); returns what it did."""
    done: dict = {}
    reference, balance = checkpoint._reference, checkpoint._moved

    def recorded(model, x):
        done["x"] = x
        return reference(model, x)

    def wrong(model, *args):
        result = balance(model, *args)
        with torch.no_grad():
            done["before"] = {k: v.clone() for k, v in model.state_dict().items()}
            i, move = _largest_hidden_change(done["before"], done["x"])
            model[0].bias[i] += move
            done["after"] = {k: v.clone() for k, v in model.state_dict().items()}
        return result

    monkeypatch.setattr(checkpoint, "_reference", recorded)
    monkeypatch.setattr(checkpoint, "_moved", wrong)
    return done


def test_change_below_float32_rounding_is_measured(monkeypatch):
    """A change of the function that float32 casts in the norm hide is measured, and exceeds
    ``sqrt(eps_float64)``: the float64 check fails (before: 1e-16, balancing's rounding)."""
    x = _x()
    done = _wrong_bias(monkeypatch)
    _, report = balance_state_dict(normed(), _float64(normed()), x)
    before, after = _hand(done["before"], x), _hand(done["after"], x)
    expected = float((after - before).abs().max() / before.abs().max())
    assert expected > 1.5 * TOL64
    assert report.per_output_exact[0] == pytest.approx(expected, rel=1e-6, abs=0)
    assert not report.kept_in_float64


def test_cli_refuses_the_hidden_change(monkeypatch, tmp_path):
    """``gaugefix balance`` refuses that change (exit 2) and writes nothing."""
    _wrong_bias(monkeypatch)
    weights, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(_float64(normed()), weights)
    args = ["balance", "--model", f"{HERE}:normed", "--weights", str(weights), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--input-shape", "1,5"])
    assert result.exit_code == 2, result.output
    assert "does not hold for this model; nothing written" in result.output
    assert not out.exists()


def _rmsnorm64(self, hidden_states):
    """``LlamaRMSNorm`` written out in float64 (no cast)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


def _rotary64(self, x, position_ids):
    """``LlamaRotaryEmbedding`` written out in float64 (no cast)."""
    freqs = position_ids[..., None].double() * self.inv_freq.double()
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def test_llama_copy_keeps_float64_digits(monkeypatch):
    """A float64 Llama checkpoint whose first ``down_proj`` balancing multiplies by
    ``1 + NUDGE``: the check measures the change the float64 forward gives (1e-12 of the
    logits), where float32 norms hid it (before: 4e-17, balancing's own rounding)."""
    balance = checkpoint._moved

    def nudged(model, *args):
        result = balance(model, *args)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1 + NUDGE)
        return result

    monkeypatch.setattr(checkpoint, "_moved", nudged)
    state = _float64(llama())
    _, report = balance_state_dict(llama(), state, _ids())
    monkeypatch.setattr(LlamaRMSNorm, "forward", _rmsnorm64)
    monkeypatch.setattr(LlamaRotaryEmbedding, "forward", _rotary64)
    model = llama().double()
    model.load_state_dict(state)
    with torch.no_grad():
        before = model(_ids()).logits
        model.model.layers[0].mlp.down_proj.weight.mul_(1 + NUDGE)
        change = float((model(_ids()).logits - before).abs().max())
    assert change > 1e3 * torch.finfo(torch.float64).eps * float(before.abs().max())
    assert report.exact_change == pytest.approx(change, rel=1e-3, abs=0)


def test_llama_outputs_match_a_float64_forward(monkeypatch):
    """The copy's logits are those of the same Llama with its norm and rotary embedding written
    out in float64 (before, they differed by 1e-8 of their largest)."""
    model = llama().double()
    x = _ids()
    checked = float64_outputs(model, x)[0]
    monkeypatch.setattr(LlamaRMSNorm, "forward", _rmsnorm64)
    monkeypatch.setattr(LlamaRotaryEmbedding, "forward", _rotary64)
    with torch.no_grad():
        reference = model(x).logits
    assert torch.allclose(checked, reference, rtol=0, atol=1e-13 * float(reference.abs().max()))


CASTS = {
    "to(dtype)": lambda t: t.to(torch.float32),
    "to(dtype=)": lambda t: t.to(dtype=torch.float16),
    "to(device, dtype)": lambda t: t.to("cpu", torch.bfloat16),
    "to(device=, dtype=)": lambda t: t.to(device="cpu", dtype=torch.float32),
    "to(tensor)": lambda t: t.to(torch.zeros(1)),
    "to(dtype, copy=True)": lambda t: t.to(torch.float32, copy=True),
    "float()": lambda t: t.float(),
    "half()": lambda t: t.half(),
    "bfloat16()": lambda t: t.bfloat16(),
    "type(dtype)": lambda t: t.type(torch.float32),
    "type(name)": lambda t: t.type("torch.FloatTensor"),
    "to(float8)": lambda t: t.to(torch.float8_e4m3fn),
}


@pytest.mark.parametrize("name", CASTS)
def test_casts_stay_float64(name):
    """Each spelling of a cast to a coarser floating dtype gives the float64 tensor's values in
    the mode, and the coarser dtype outside it (nothing is left changed)."""
    t = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    with Float64Throughout():
        inside = CASTS[name](t)
    assert inside.dtype == torch.float64 and torch.equal(inside, t)
    assert CASTS[name](t).dtype != torch.float64
    assert torch._C._len_torch_function_stack() == 0


def test_dtype_keywords_name_float64():
    """A ``dtype=`` keyword naming a coarser floating dtype (a softmax's, a factory's) names
    float64 in the mode."""
    t = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    with Float64Throughout():
        soft = torch.softmax(t, -1, dtype=torch.float32)
        zeros = torch.zeros(3, dtype=torch.float16)
    assert soft.dtype == torch.float64 and torch.equal(soft, torch.softmax(t, -1))
    assert zeros.dtype == torch.float64


def test_other_casts_unchanged():
    """Casts to integer dtypes, bit views and int -> float stay as they are (the last in
    float64)."""
    t = torch.tensor([0.1, -2.5], dtype=torch.float64)
    with Float64Throughout():
        assert t.to(torch.int32).dtype == torch.int32
        assert t.view(torch.float32).shape == (4,)
        assert t.view(dtype=torch.float16).shape == (8,)
        assert torch.arange(3).float().dtype == torch.float64


def test_mode_is_per_thread():
    """Another thread running while the mode is on casts as usual."""
    seen = []
    with Float64Throughout():
        worker = threading.Thread(target=lambda: seen.append(torch.ones(2).double().float().dtype))
        worker.start()
        worker.join()
    assert seen == [torch.float32]
