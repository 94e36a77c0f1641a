"""The quantization benchmark (``make bench``, section ``quant``): its quantizers are the
symmetric formulas, and every equalization path runs, on a tiny untrained case."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quantization  # noqa: E402

from gaugefix import zoo  # noqa: E402


def assert_nearest_on_grid(got: torch.Tensor, w: torch.Tensor, step: torch.Tensor, lo: int,
                           hi: int) -> None:  # fmt: skip
    """``got`` is ``q * step`` with integer ``q`` in ``[lo, hi]``, within half a step of ``w``
    (rounding to nearest); the largest entry keeps its grid point."""
    q = got / step
    assert torch.allclose(q, q.round(), rtol=0, atol=1e-4)
    assert int(q.round().min()) >= lo and int(q.round().max()) <= hi
    assert bool(((got - w).abs() <= step * (0.5 + 1e-5)).all())


def test_per_tensor_int8_is_round_to_the_max_abs_grid():
    torch.manual_seed(0)
    w = torch.randn(7, 5) * torch.logspace(-1, 1, 5)
    step = w.abs().max() / 127
    got = quantization.fake_quant(w, tuple(w.shape), quantization.INT8)
    assert_nearest_on_grid(got, w, step, -127, 127)


def test_per_channel_int4_has_one_step_per_output_row():
    torch.manual_seed(0)
    w = torch.randn(6, 9) * torch.logspace(-2, 1, 6)[:, None]
    step = w.abs().amax(1, keepdim=True) / 7.5  # symmetric over [-8, 7]
    got = quantization.fake_quant(w, (1, 9), quantization.INT4)
    assert_nearest_on_grid(got, w, step, -8, 7)


def test_every_method_runs_and_keeps_the_function():
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    model = zoo.mlp((8, 16, 4)).eval()
    case = quantization.Case("tiny", model, quantization._accuracy(x, y), "accuracy %", x[:2], x)
    rows = quantization.run_case(case, log=lambda _: None)
    assert [r["variant"] for r in rows] == ["trained", "scrambled"]
    for row in rows:
        methods = row["methods"]
        for method in ("none", "balance_", "range", "activation"):
            assert methods[method]["status"] == "ok"
            assert methods[method]["output_change"] <= 1e-5
            assert methods[method]["fp32"] == methods["none"]["fp32"]
        for method in ("brevitas", "aimet"):  # ran, or says why not in one line
            assert methods[method]["status"] == "ok" or "\n" not in methods[method]["status"]


FAKE_AIMET = """import torch
def equalize_model(model, dummy_input):
    if dummy_input.shape != (2, 1, 8, 8):
        raise ValueError("no layers to equalize")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
"""


def test_aimet_runs_in_its_own_interpreter(tmp_path, monkeypatch):
    """With ``AIMET_PYTHON`` set, the model is saved whole, equalized by that interpreter and its
    state loaded back (a stand-in ``aimet_torch`` that doubles every parameter); that
    interpreter's error comes back as one line."""
    (tmp_path / "aimet_torch").mkdir()
    (tmp_path / "aimet_torch" / "__init__.py").write_text("")
    (tmp_path / "aimet_torch" / "cross_layer_equalization.py").write_text(FAKE_AIMET)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv(quantization.AIMET_PYTHON, sys.executable)
    torch.manual_seed(0)
    model = quantization.SeparableCNN(width=4, blocks=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = quantization._aimet(model, torch.randn(2, 1, 8, 8))
    assert all(torch.equal(out.state_dict()[k], 2 * v) for k, v in before.items())
    with pytest.raises(RuntimeError, match="ValueError: no layers to equalize$"):
        quantization._aimet(model, torch.randn(1, 1, 8, 8))


def _row(model: str, metric: str, seed: int, scores: dict[str, dict[str, float]]) -> dict:
    """A measured row: per method its scores (every scheme's, ``fp32`` from ``none``)."""
    methods = {}
    for method in quantization.METHODS:
        given = scores.get(method)
        if given is None:
            methods[method] = {"status": "ValueError: refused"}
            continue
        full = {s: given.get(s, 90.0) for s in quantization.SCHEMES}
        methods[method] = {"status": "ok", "output_change": given.get("change", 1e-7), **full}
    return {"model": model, "variant": "trained", "metric": metric, "methods": methods,
            "seed": seed}  # fmt: skip


def test_range_is_compared_with_the_anchors_by_the_mean_over_seeds():
    """Per scheme the mean over seeds of range minus the anchor; the figure is the least of
    them, labelled with its scheme and the seeds' spread; an anchor that refused any seed's
    model, or that left every model unchanged, is said so."""
    w4, w8a8 = "w4 per-channel", "w8a8"
    range_ = [{w4: 80.0, w8a8: 98.0}, {w4: 70.0, w8a8: 98.4}, {w4: 75.0, w8a8: 97.0}]
    same = {"change": 0.0}  # output unchanged
    brevitas = [{w4: 79.0, w8a8: 98.2}, {w4: 72.0, w8a8: 98.0}, {w4: 74.0, w8a8: 97.4}]
    rows = [
        _row("m", "accuracy %", seed, {"none": {}, "range": r, "brevitas": b, "aimet": same})
        for seed, (r, b) in enumerate(zip(range_, brevitas, strict=True))
    ]
    got = quantization._against_anchors(rows)
    assert "range minus aimet (it left the model unchanged), worst scheme" in got[1][0]
    what, figure, target, kind, unit = got[0]
    assert figure == pytest.approx((-0.2 + 0.4 - 0.4) / 3)  # w8a8: mean 0 - 0.0667 < w4's 0
    assert what == (
        "m, trained, mean over 3 seeds: range minus brevitas, worst scheme (accuracy %; w8a8: "
        "range >= brevitas on 1 of 3 seeds, per seed -0.40 to +0.40)"
    )
    assert (target, kind, unit) == (0.0, "min", "points")
    rows[1]["methods"]["brevitas"] = {"status": "ValueError: refused"}
    assert [g[0] for g in quantization._against_anchors(rows)] == [got[1][0]]


def test_the_losses_are_compared_with_the_sign_that_favours_lower_loss():
    lower, higher = (dict.fromkeys(quantization.SCHEMES, v) for v in (2.0, 2.5))
    rows = [_row("gpt", "loss", 0, {"none": {}, "range": lower, "aimet": higher})]
    ((what, figure, _, _, unit),) = quantization._against_anchors(rows)
    assert figure == pytest.approx(0.5) and unit == "nats"
    assert what == "gpt, trained: range minus aimet, worst scheme (loss)"  # one seed: no spread


def test_the_table_gives_the_seeds_mean_and_range():
    seeds = [_row("m", "accuracy %", s, {"none": {"fp32": 97.0 + s}}) for s in range(2)]
    results = {"cases": [{k: v for k, v in seeds[0].items() if k != "seed"}], "seeds": seeds}
    table = quantization.render(results)
    assert "Trained models over 2 seeds" in table
    assert "| m (accuracy %) | none | 97.50 [97.00, 98.00] | 90.00 [90.00, 90.00] |" in table
    assert "| m (accuracy %) | brevitas | refused: ValueError: refused |  |  |  |" in table
