"""Small defects left open by earlier audits, each with its neighbours: safetensors output of
tensors sharing memory (``write_state_dict``), relaxation rates of weights whose squares leave
float64's normal range (``relaxation_rates``), and the report's per-seed lower-bound marks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import gaugefix as gf
from faults import listing
from gaugefix import zoo
from gaugefix.checkpoint import (
    CheckpointError,
    StateDictFile,
    balance_state_dict,
    read_state_dict,
    write_state_dict,
)
from gaugefix.cli import app
from runs import run_result

cli = CliRunner()
EXACT = 1e-10  # relative tolerance of the rates (of their largest one)
TINY = 2.0**-515  # about 1e-155: its square, 2^-1030, is below float64's smallest normal number


# -- 1. write_state_dict: tensors that share memory, and what safetensors cannot hold -----------


def tied_gpt() -> nn.Module:
    """A small float64 GPT whose head is the token embedding (one parameter, two names)."""
    torch.manual_seed(0)
    return zoo.GPT(vocab=16, dim=8, heads=2, layers=1, tied=True).double()


def _read_back(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``tensors`` written as safetensors to ``path`` and read back."""
    write_state_dict(StateDictFile(tensors, "safetensors"), path)
    back = read_state_dict(path)
    assert back.format == "safetensors"
    return back.tensors


def test_tied_weights_balance_and_write_as_safetensors_under_every_name(tmp_path):
    """Was: ``RuntimeError: Some tensors share memory`` from safetensors. The model's own state
    dict (head and embedding one storage) balanced: every name written with its values."""
    model, ids = (
        tied_gpt(),
        torch.randint(0, 16, (1, 8), generator=torch.Generator().manual_seed(1)),
    )
    gf.random_gauge_(model, gf.discover(model, ids), 1.5, torch.Generator().manual_seed(2))
    state = model.state_dict()
    assert state["head.weight"].data_ptr() == state["wte.weight"].data_ptr()
    tensors, report = balance_state_dict(tied_gpt(), state, ids)
    assert report.within_tolerance and report.before["mu_rel_max"] > 0.5
    back = _read_back(tensors, tmp_path / "out.safetensors")
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], tensors[k]) for k in state)
    assert tensors["head.weight"].data_ptr() == tensors["wte.weight"].data_ptr()  # still tied
    assert sum(not torch.equal(back[k], v) for k, v in state.items()) > 5  # balanced


def test_views_of_one_storage_write_as_safetensors(tmp_path):
    """A transposed view (not contiguous) and overlapping slices of one storage: each name gets
    its own values (safetensors refused both)."""
    base = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tensors = {"w": base, "w_t": base.t(), "tail": base[1:], "col": base[:, 1]}
    back = _read_back(tensors, tmp_path / "views.safetensors")
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[k], v) and back[k].is_contiguous() for k, v in tensors.items())


def gpt2() -> nn.Module:
    """A tiny GPT-2 (1 layer, width 16) whose output layer is tied to the token embedding."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=20, use_cache=False,
        activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def test_a_gpt2_safetensors_file_storing_the_tie_twice_keeps_both_names(tmp_path):
    """``gaugefix balance`` of a GPT-2 file holding lm_head and wte as two equal tensors (the
    file's own way of storing the tie): both written, equal, balanced."""
    model = gpt2()
    ids = torch.randint(0, 20, (1, 8), generator=torch.Generator().manual_seed(0))
    gf.random_gauge_(model, gf.discover(model, ids), 1.5, torch.Generator().manual_seed(1))
    state = model.state_dict()
    path = tmp_path / "gpt2.safetensors"
    save_file({k: v.clone() for k, v in state.items()}, path)
    args = ["balance", "--model", "test_leftovers:gpt2", "--weights", str(path), "--out"]
    result = cli.invoke(app, [*args, str(path), "--input-ids", "1,8", "--vocab", "20"])
    assert result.exit_code == 0, result.output
    written = read_state_dict(path).tensors
    assert sorted(written) == sorted(state)
    assert torch.equal(written["lm_head.weight"], written["transformer.wte.weight"])
    assert sum(not torch.equal(written[k], v) for k, v in state.items()) > 5  # balanced


BAD_STATES = {
    "unknown format": lambda: StateDictFile({"a": torch.ones(2)}, "safetensor"),  # type: ignore
    "metadata not strings": lambda: StateDictFile({"a": torch.ones(2)}, "safetensors", {"k": 1}),
    "not a tensor": lambda: StateDictFile({"a": 1.0}, "safetensors"),  # type: ignore[dict-item]
    "not a tensor (torch)": lambda: StateDictFile({"a": [1.0]}, "torch"),  # type: ignore
    "a name not a string": lambda: StateDictFile({1: torch.ones(2)}, "safetensors"),  # type: ignore
    "complex128": lambda: StateDictFile(
        {"a": torch.ones(2, dtype=torch.complex128)}, "safetensors"
    ),
    "sparse": lambda: StateDictFile({"a": torch.eye(2).to_sparse()}, "safetensors"),
    "meta": lambda: StateDictFile({"a": torch.ones(2, device="meta")}, "torch"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_what_cannot_be_written_is_refused_in_one_line_and_nothing_changes(tmp_path, case):
    """Was: safetensors' own errors (``TypeError``, ``KeyError``, ...), an unknown format written
    as a PyTorch file, a list or a meta tensor written into a PyTorch file."""
    out = tmp_path / "out.bin"
    out.write_bytes(b"as it was")
    before = listing(tmp_path)
    with pytest.raises(CheckpointError) as err:
        write_state_dict(BAD_STATES[case](), out)
    assert len(str(err.value).splitlines()) == 1
    assert listing(tmp_path) == before and out.read_bytes() == b"as it was"


# -- 2. relaxation_rates: weights whose squares leave float64's normal range --------------------


def scaled_mlp(scale: float) -> tuple[nn.Module, gf.GaugeStructure]:
    """A float64 ReLU MLP (70 generators) with every parameter multiplied by ``scale``."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 40, 30, 2)).double()
    structure = gf.discover(model, torch.randn(1, 3, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model, structure


def _close(rates: torch.Tensor, expected: torch.Tensor) -> bool:
    return float((rates - expected).abs().max()) <= EXACT * float(expected.abs().max())


@pytest.mark.parametrize("k", [None, 3], ids=["dense", "sparse"])
@pytest.mark.parametrize(
    "scale",
    [TINY, 2.0**-500, 2.0**-45, 2.0**40, 2.0**500, 2.0**510],
    ids=["1e-155", "3e-151", "3e-14", "1e12", "3e150", "3e153"],
)
def test_rates_are_scale_covariant_to_1e_10(scale, k):
    """``K(c W) = c^2 K(W)``: the rates of ``c W`` at strength ``l`` are those of ``W`` at
    ``l c^2``, and the modes the same. Was: 1e-155, sparse: SciPy's LU 'exactly singular';
    dense: 2e-13 off; 3e-151 and 3e-14, sparse: 2e-3 off; 1e12 and 3e150, sparse: 4e-9 off
    (ARPACK's absolute convergence floor); 3e153: refused, 'the squared parameters overflow
    float64', though the rates (up to 1e307) do not."""
    base = 2.0**-30 if scale < 1 else 2.0**30  # the strength of W: l = base / c^2 is normal
    model, s = scaled_mlp(scale)
    reference, _ = scaled_mlp(1.0)
    got = gf.relaxation_rates(model, s, base / scale**2, k=k)
    want = gf.relaxation_rates(reference, s, base, k=k)
    dense = gf.relaxation_rates(reference, s, base)
    assert _close(got.rates, want.rates) and got.complete == want.complete
    if k is None:
        assert _close(got.rates, dense.rates)
    else:
        assert _close(got.rates, torch.cat([dense.rates[:k], dense.rates[-k:]]))
    overlap = (got.modes.T @ want.modes).abs().diagonal()  # distinct rates: one mode each
    assert float((overlap - 1).abs().max()) <= EXACT


@pytest.mark.parametrize("k", [None, 3], ids=["dense", "sparse"])
@pytest.mark.parametrize(
    ("scale", "strength"),
    [(TINY, 1.0), (1e-170, 1.0), (1.0, 1e308), (1.0, 8.5e307), (1.0, 1e-320), (2.0**520, 1.0)],
    ids=["subnormal", "zero", "inf", "inf-rate-only", "subnormal-strength", "overflow"],
)
def test_rates_outside_floats_normal_range_are_refused(scale, strength, k):
    """Rates ``2 strength K`` that float64 cannot hold to its precision are refused in one line
    (was: 1e-170 weights all rates exactly 0, 'no relaxation'; strength 1e308 or 8.5e307: inf;
    strength 1e-320 or 1e-155 weights: subnormal rates, a few digits; sparse at 1e-155: SciPy's
    error). The model is unchanged."""
    model, s = scaled_mlp(scale)
    state = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="float64") as err:
        gf.relaxation_rates(model, s, strength, k=k)
    assert len(str(err.value).splitlines()) == 1
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items())


def _far_from_balance() -> tuple[nn.Module, gf.GaugeStructure]:
    """A ReLU MLP moved along its orbit by up to ``e^6`` per neuron (``K``'s diagonal spans 3e5
    to 1e25): where ARPACK stops converging depends on the CPU's floating-point kernels."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 40, 30, 20, 2)).double()
    s = gf.discover(model, torch.randn(1, 3, dtype=torch.float64))
    gf.random_gauge_(model, s, 6.0, torch.Generator().manual_seed(0))
    return model, s


def test_arpack_that_does_not_converge_is_one_line_naming_the_dense_path(monkeypatch):
    """SciPy's ``ArpackNoConvergence`` (forced here: whether this model meets it depends on the
    CPU) is one line naming the dense path, which gives every rate."""
    import scipy.sparse.linalg as sla

    def fails(mat, k, *args, **kwargs):
        raise sla.ArpackNoConvergence("ARPACK error -1: No convergence", [], [])

    model, s = _far_from_balance()
    monkeypatch.setattr(sla, "eigsh", fails)
    with pytest.raises(ValueError, match=r"dense path \(k=None, dense_limit >= 90\)") as err:
        gf.relaxation_rates(model, s, 1.0, k=3)
    assert len(str(err.value).splitlines()) == 1
    monkeypatch.undo()
    dense = gf.relaxation_rates(model, s, 1.0)
    assert dense.complete and bool(torch.isfinite(dense.rates).all())


def test_arpack_far_from_balance_is_exact_or_refused():
    """On the same model ARPACK itself either converges to the dense path's extreme rates or
    is refused in one line (on AMD EPYC it does not converge; on an Intel Xeon it does)."""
    model, s = _far_from_balance()
    dense = gf.relaxation_rates(model, s, 1.0).rates.sort().values
    try:
        ends = gf.relaxation_rates(model, s, 1.0, k=3).rates.sort().values
    except ValueError as err:
        assert len(str(err).splitlines()) == 1 and "dense path" in str(err)
        return
    want = torch.cat([dense[:3], dense[-3:]])
    assert float((ends - want).abs().max()) <= 1e-8 * float(dense.abs().max())


def test_zero_strength_and_zero_weights_give_exact_zero_rates():
    """Strength 0 on tiny weights, and an all-zero model, are exact zeros (not refused)."""
    model, s = scaled_mlp(TINY)
    assert torch.equal(gf.relaxation_rates(model, s, 0.0).rates.abs(), torch.zeros(70).double())
    zero, s0 = scaled_mlp(0.0)
    for k in (None, 3):
        assert torch.equal(
            gf.relaxation_rates(zero, s0, 1.0, k=k).rates.abs().max(), torch.zeros(()).double()
        )


# -- 3. the report's per-seed lower-bound marks --------------------------------------------------

GRID = [2.0**k for k in range(-3, 2)]  # 0.125 .. 2


def _interrupted_store(tmp_path: Path, task: str = "t", reference: str = "plain") -> str:
    """``reference``: both seeds the whole grid, stable to 0.5; exact: seed 0 the whole grid,
    stable to 1, seed 1 only 0.125 and 0.25 (interrupted), stable at both. The report's
    text."""
    import gaugefix.report as report
    from gaugefix.experiments.store import Store

    store = Store(tmp_path / report.STORE_NAME)
    runs = [run_result(reference, lr, 0.5, seed=k, task=task) for k in (0, 1) for lr in GRID]
    runs += [run_result("exact", lr, 1.0, seed=0, task=task) for lr in GRID]
    runs += [run_result("exact", lr, 4.0, seed=1, task=task) for lr in GRID[:2]]
    for r in runs:
        store.add_run(r, 0.0)
    summary = report.render(tmp_path, quick=False)
    ratios = summary["tasks"][task]["regimes"]["sgd/full/10"]["expansion_ratio"]
    stats = ratios[reference]["exact"]
    assert stats["0.0"]["lower_bound"] is True  # stability.py: seed 1's 0.25 is a lower bound
    return (tmp_path / "report.md").read_text()


def test_an_interrupted_seeds_edge_is_marked_as_a_lower_bound(tmp_path):
    text = _interrupted_store(tmp_path)
    # seed 1's 0.25 (max_stable_lr, then bisected edge); seed 0's either way (the ratio counts
    # it as a bound too: stability's top of a cell is the least of its seeds' highest rates)
    assert re.search(r"\| exact \| ≥ 0\.25 \((≥ )?1, ≥ 0\.25\) \|", text)
    assert re.search(r"\| exact \| \((≥ )?1\.41, ≥ 0\.25\) \|", text)


def test_an_interrupted_seeds_edge_is_marked_in_the_realistic_table(tmp_path):
    text = _interrupted_store(tmp_path, "char-gpt")
    assert re.search(r"\| exact \|  \| (≥ )?0\.832 \((≥ )?1\.41, ≥ 0\.25\) \|", text)


def test_an_interrupted_seeds_edge_is_drawn_as_a_lower_bound(tmp_path, monkeypatch):
    """The figure against a balanced start: exact's seed 1 (edge 0.25, nothing run above it)."""
    from matplotlib.axes import Axes

    markers = []
    original = Axes.scatter

    def scatter(ax, x, y, *args, **kwargs):
        markers.append((y, kwargs.get("marker")))
        return original(ax, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "scatter", scatter)
    _interrupted_store(tmp_path, reference="balanced-init")
    assert (0.25, "^") in markers
