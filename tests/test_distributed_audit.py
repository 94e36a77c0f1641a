"""FSDP2 cases beyond tests/test_fsdp.py, 2 gloo processes on CPU in float64
(``tests/fsdp_worker.py audit``): a model sharded in part, parameters FSDP2 holds gathered after
a forward, arguments that differ between the ranks, the shard structure's whole-model views,
the checkpoint helper, and training with Adam on separately sharded layers (a frozen weight, a
tied GPT)."""

from __future__ import annotations

import pytest
import torch

from test_fsdp import WORKER, finish, start

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

IN_PLACE = [
    "balance_", "apply_gauge_", "random_gauge_", "relax_", "equalize_norm", "equalize_range",
    "equalize_activation", "GaugeFixing",
]  # fmt: skip


@pytest.fixture(scope="module")
def audit() -> dict:
    return finish(start(WORKER, ["audit"], distributed=True))


def refused(result: dict, words: str) -> None:
    """Every rank raised a one-line ShardingError holding ``words``; nothing changed."""
    assert result["unchanged"]
    for error in result["errors"]:
        assert error is not None and error[0] == "ShardingError", error
        assert words in error[1] and "\n" not in error[1], error


@pytest.mark.parametrize("function", ["imbalance_stats", "imbalance", *IN_PLACE])
def test_model_sharded_in_part_is_refused(audit, function):
    """fully_shard on a later block only: the first parameters are plain tensors (before, the
    whole-model path ran into DTensor's 'mixed torch.Tensor and DTensor' errors, or refused
    with a message asking for whole parameters)."""
    words = "is sharded (an FSDP2 DTensor)" if "equalize" in function else "is not sharded"
    refused(audit["partly_sharded"][function], words)


@pytest.mark.parametrize("function", ["imbalance_stats", "imbalance", *IN_PLACE])
def test_gathered_parameters_are_refused(audit, function):
    """fully_shard on the root only, after a forward: FSDP2 holds the parameters gathered,
    and a change to them is dropped when it reshards (before, balance_ reported a balanced
    model and the model stayed where it was)."""
    refused(audit["gathered"][function], "call reshard() on each FSDPModule")


def test_gathered_parameters_in_part_or_in_another_dtype_and_resharded(audit):
    result = audit["gathered"]
    # some parameters gathered, others sharded; gathered in bfloat16 (mixed precision), where
    # imbalance_stats returned the statistics of the bfloat16 copies
    refused(result["stats_mixed"], "call reshard() on each FSDPModule")
    refused(result["stats_mixed_precision"], "call reshard() on each FSDPModule")
    # after reshard(): the whole model's result
    assert result["balance_after_reshard"] <= 1e-10
    assert result["balance_after_reshard_norm"] <= 1e-10


@pytest.mark.parametrize(
    "case",
    ["random_gauge_global_rng", "relax_rate", "relax_rate_kind", "balance_tol"],
)
def test_arguments_differing_between_ranks_are_refused_on_every_rank(audit, case):
    """A gauge drawn from a global generator seeded per rank moved each rank's slices by
    another gauge (the function changed); a rate or tolerance differing between the ranks gave
    different steps or different numbers of collectives."""
    refused(audit["rank_dependent"][case], "differs between the processes")


@pytest.mark.parametrize(
    ("case", "own"),
    [
        ("apply_gauge_nan_on_one", "h must be a finite floating-point tensor"),
        ("balance_tol_invalid_on_one", "tol"),
    ],
)
def test_argument_invalid_on_one_rank_raises_on_every_rank(audit, case, own):
    """The rank with the invalid argument raises its own error, the others a ShardingError;
    before, only one rank raised and the other waited in the next all-reduce."""
    result = audit["rank_dependent"][case]
    assert result["unchanged"]
    (kind0, message0), (kind1, message1) = result["errors"]
    assert kind0 == "ShardingError" and "differs between the processes" in message0
    assert kind1 == "ValueError" and own in message1


def test_same_generator_on_every_rank_gives_the_whole_models_gauge(audit):
    assert audit["rank_dependent"]["random_gauge_same_generator"] <= 1e-12


def test_shard_structure_reports_the_whole_structure_on_every_rank(audit):
    """Rank 1 holds no slice of the one-row MLP: its summary said 'over 1 parameters'."""
    for key, values in audit["shard_structure"].items():
        assert values == [True, True], key


@pytest.mark.parametrize("case", ["sharded_model", "sharded_state_dict"])
def test_checkpoint_helper_refuses_shards(audit, case):
    """Before: an AssertionError from deepcopy, or load_state_dict's multi-line error."""
    result = audit["checkpoint"][case]
    for error in result["errors"]:
        assert error is not None and error[0] == "ShardingError" and "\n" not in error[1]


def test_adam_training_on_separately_sharded_layers_matches_the_whole_model(audit):
    result = audit["training"]
    for mode in ("exact", "penalty"):
        assert result[mode]["params"] <= 1e-10 and result[mode]["moments"] <= 1e-10, mode
        steps = result[mode]["steps"]
        assert steps[0] == steps[1] > 0, mode
    assert result["tied_gpt"] <= 1e-10
