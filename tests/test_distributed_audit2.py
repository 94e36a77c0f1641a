"""Second audit of gauge fixing in distributed and framework training: FSDP2 and DDP on 2 gloo
processes on CPU in float64 (``tests/fsdp_worker.py``, :func:`run_audit2`), the Hugging Face
``Trainer`` with ``torch_compile=True``, and the hook's saved state."""

from __future__ import annotations

import pytest
import torch

import gaugefix
from gaugefix import zoo
from gaugefix.distributed import structure_fingerprint
from test_fsdp import run_in_processes

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

TOL = 1e-12  # relative; measured: below 1e-15
DIFFERS = "the gauge structure differs between the processes"


@pytest.fixture(scope="module")
def audit() -> dict:
    return run_in_processes("import fsdp_worker; fsdp_worker.run_audit2()")


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_fsdp_param_groups_and_scheduler_match_the_whole_model(audit, mode):
    """Two parameter groups at different learning rates (per-generator rates), a LambdaLR
    schedule, orbit steps every 2 steps: the slices train like the whole model."""
    result = audit[f"groups_{mode}"]
    assert result["params"] <= TOL
    assert result["steps"][0] == result["steps"][1] == (2 if mode == "exact" else 5)


def test_fsdp_hook_state_resumes_the_interval(audit):
    result = audit["resumed"]
    assert result["params"] == 0.0 and result["steps"] == [1, 1]


def test_fsdp_penalty_on_a_parameter_without_gradient_is_that_of_the_whole_model(audit):
    """Before: a ValueError ('has no gradient to add the penalty's to') on every rank, where the
    whole model takes the penalty's gradient alone (its parameters then differed by 0.57)."""
    result = audit["missing_gradient"]
    assert result["sharded"]["errors"] == [None, None]
    assert result["params"] <= TOL


@pytest.mark.parametrize("function", ["GaugeFixing", "balance_"])
def test_fsdp_structures_numbered_differently_are_refused(audit, function):
    """Rank 1 holds the same group with its generators numbered in reverse. Before: the
    generator sums of different neurons were added up, and GaugeFixing's start balancing
    changed the model's function by 8.7% (relative), without a word."""
    result = audit["structure_differs"][function]
    assert result["unchanged"]
    for error in result["errors"]:
        assert error is not None and error[0] == "ShardingError" and DIFFERS in error[1]
    assert audit["structure_differs"]["function_change"] <= TOL


@pytest.mark.parametrize("case", ["ddp", "callbacks"])
def test_ddp_replicas_with_different_structures_are_refused(audit, case):
    """Rank 1's structure leaves out two units (as a batch that did not reach an expert does).
    Before: each replica was balanced and relaxed by its own group, and after 2 steps the
    replicas' parameters differed by 0.51. The callbacks check the same before attaching."""
    result = audit["structure_differs"][case]
    for error in result["errors"]:
        assert error is not None and error[0] == "ShardingError" and DIFFERS in error[1]
    assert result["unchanged"]
    assert result.get("replica_diff", 0.0) == 0.0
    for error in result.get("compiled", []):
        assert error is not None and error[0] == "ShardingError" and DIFFERS in error[1]


def test_fingerprint_tells_structures_apart():
    torch.manual_seed(0)
    model = zoo.mlp((8, 6, 6, 1))
    structure = gaugefix.discover(model, torch.randn(1, 8))
    again = gaugefix.discover(model, torch.randn(1, 8))
    copy = gaugefix.GaugeStructure.from_dict(structure.to_dict())
    assert torch.equal(structure_fingerprint(structure), structure_fingerprint(again))
    assert torch.equal(structure_fingerprint(structure), structure_fingerprint(copy))
    data = structure.to_dict()  # generators 0 and 6 swapped (same kinds, same count)
    for param in data["params"]:
        for term in param["terms"]:
            term["index"]["data"] = [{0: 6, 6: 0}.get(v, v) for v in term["index"]["data"]]
    swapped = gaugefix.GaugeStructure.from_dict(data)
    restricted = structure.restrict(torch.arange(12) > 0, "left out")
    for other in (swapped, restricted):
        assert not torch.equal(structure_fingerprint(structure), structure_fingerprint(other))
    values = structure_fingerprint(structure)
    assert values.dtype == torch.float64 and bool((values < 2.0**48).all())


def test_hook_state_inside_an_interval_without_learning_rate_sums_is_refused():
    """Before: accepted, and the next orbit step relaxed at a rate without the saved steps'
    learning rates."""
    torch.manual_seed(0)
    model = zoo.mlp((4, 5, 1))
    structure = gaugefix.discover(model, torch.randn(1, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fixing = gaugefix.GaugeFixing(opt, model, structure, 1.0, every=3, balance_at_start=False)
    before = fixing.state_dict()
    with pytest.raises(ValueError, match="has no sums of their learning rates"):
        fixing.load_state_dict({"steps": 1, "skipped": 0, "since": 2, "lr_sums": []})
    assert fixing.state_dict() == before
    fixing.load_state_dict({"steps": 1, "skipped": 0, "since": 2, "lr_sums": [0.2]})
    assert fixing.state_dict() == {"steps": 1, "skipped": 0, "since": 2, "lr_sums": [0.2]}


def test_hf_resume_with_accumulation_and_a_schedule_continues_bit_identically(tmp_path):
    """2 accumulated micro-batches per step, warmup then cosine decay, orbit steps every 3
    steps: 8 steps saved at step 4 and resumed from checkpoint-4 give the same parameters as the
    uninterrupted run, bit for bit, with the same number of orbit steps."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_hf_trainer import gpt2, max_diff, train

    options = {
        "gradient_accumulation_steps": 2, "per_device_train_batch_size": 4,
        "lr_scheduler_type": "cosine", "warmup_steps": 2, "save_strategy": "steps",
        "save_steps": 4, "callback_options": {"every": 3},
    }  # fmt: skip
    whole = gpt2()
    _, uninterrupted = train(whole, tmp_path, **options)
    resumed = gpt2()
    _, callback = train(resumed, tmp_path, resume=str(tmp_path / "checkpoint-4"), **options)
    assert callback.steps == uninterrupted.steps == 2
    assert max_diff(whole, resumed) == 0.0


def test_hf_trainer_with_torch_compile_matches_eager(tmp_path):
    """``TrainingArguments(torch_compile=True)``: the callback's discovery runs in a forward
    pre-hook inside the compiled forward. Before: Dynamo traced discover() and failed
    ('Attempt to trace forbidden callable set_stance'). Now the same model bit for bit as
    without compiling (backend 'eager', float64, orbit steps every 3 steps)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_hf_trainer import gpt2, max_diff, train

    options = {"callback_options": {"every": 3}}
    compiled = gpt2(torch.float64)
    _, callback = train(
        compiled, tmp_path / "c", torch_compile=True, torch_compile_backend="eager", **options
    )
    eager = gpt2(torch.float64)
    _, reference = train(eager, tmp_path / "e", **options)
    assert callback.steps == reference.steps == 2
    assert max_diff(compiled, eager) == 0.0


def test_lightning_module_built_in_configure_model(tmp_path):
    """A LightningModule that builds its layers in ``configure_model`` (Lightning's hook for
    large and sharded models). Before: the callback bound or discovered the structure at
    ``setup``, before the layers existed, and refused the fit ('the structure does not match:
    no parameter net.0.weight', or a TracingError when discovering). Now it trains like the
    same module built in ``__init__``, bit for bit, with a given or a discovered structure."""
    pytest.importorskip("lightning.pytorch")
    from gaugefix.integrations.lightning import GaugeFixingCallback
    from test_lightning import Regressor, fit

    class Late(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.net = None

        def configure_model(self) -> None:
            if self.net is None:
                torch.manual_seed(0)
                self.net = zoo.mlp((4, 16, 16, 1))

    torch.manual_seed(0)
    reference = Regressor()
    structure = gaugefix.discover(reference, torch.randn(2, 4))
    fit(reference, GaugeFixingCallback(1.0, structure=structure, every=2), tmp_path / "r")
    for given in (structure, None):
        late = Late()
        callback = GaugeFixingCallback(1.0, structure=given, every=2)
        fit(late, callback, tmp_path / str(given is None))
        assert callback.state_dict()["hooks"][0]["steps"] == 3
        for p, q in zip(late.parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q)
