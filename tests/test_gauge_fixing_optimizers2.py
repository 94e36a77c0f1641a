"""``GaugeFixing`` over several optimizers, as a user breaks it: one optimizer that stops
stepping (logged once), a parameter group added to an optimizer other than the last in the
middle of an interval (each optimizer's sums stay its own), a parameter held by two optimizers
(refused), and a ``torch.compile``'d ``optimizer.step`` (the hooks run eagerly)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import gaugefix
from test_gauge_fixing_optimizers import (
    STRENGTH,
    assert_models_close,
    gpt,
    gradients,
    hooks,
    muon_adamw,
    split,
    train,
)

pytestmark = pytest.mark.usefixtures("single_thread")

O = torch.optim
LR_A, LR_B, LR_ADDED = 0.01, 0.02, 0.05
OPEN = "stepped again before optimizer(s) [1]"


def test_an_optimizer_that_stops_stepping_is_logged_once(caplog):
    model, s = gpt()
    opts = muon_adamw(model)
    hook = gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=1, balance_at_start=False)
    with caplog.at_level(logging.WARNING, logger="gaugefix.train.hook"):
        train(model, opts, range(2))  # both step: no warning
        assert not [r for r in caplog.records if OPEN in r.getMessage()]
        train(model, opts, range(2, 6), order=(0,))  # AdamW never steps again
    assert hook.steps == 2 and hook.skipped == 0
    assert len([r for r in caplog.records if OPEN in r.getMessage()]) == 1


def test_a_group_added_to_the_first_optimizer_mid_interval_keeps_each_optimizers_sums():
    model, s = gpt()
    params = dict(model.named_parameters())
    matrices, rest = split(model)
    added = params[matrices[0]]
    a = O.SGD([params[n] for n in matrices[1:]], lr=LR_A)
    b = O.SGD([params[n] for n in rest], lr=LR_B)
    logging.disable(logging.WARNING)  # the parameter not held yet: its generators left out
    try:
        hook = gaugefix.GaugeFixing([a, b], model, s, STRENGTH, every=3, balance_at_start=False)
        train(model, [a, b], range(1))
        a.add_param_group({"params": [added], "lr": LR_ADDED})
        train(model, [a, b], range(1, 2))
    finally:
        logging.disable(logging.NOTSET)
    # optimizer 0's two groups, then optimizer 1's: the added group's sum starts at its step
    assert hook.state_dict()["lr_sums"] == [LR_A + LR_A, LR_ADDED, LR_B + LR_B]


def test_a_parameter_held_by_two_optimizers_is_refused_with_nothing_attached():
    model, s = gpt()
    before = copy.deepcopy(model.state_dict())
    params = dict(model.named_parameters())
    matrices, rest = split(model)
    a = O.AdamW([params[n] for n in matrices + rest[-1:]], lr=LR_A)
    b = O.AdamW([params[n] for n in rest], lr=LR_B)
    with pytest.raises(ValueError, match=f"{rest[-1]!r} is held by optimizers 0 and 1"):
        gaugefix.GaugeFixing([a, b], model, s, STRENGTH)
    assert hooks(a) == hooks(b) == 0
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name])


def test_a_compiled_optimizer_step_equals_the_eager_step():
    model, s = gpt()
    twin = copy.deepcopy(model)
    runs = []
    for m, compiled in ((model, True), (twin, False)):
        opts = [O.SGD(o.param_groups[0]["params"], lr=0.01, momentum=0.9) for o in muon_adamw(m)]
        hook = gaugefix.GaugeFixing(opts, m, s, STRENGTH, every=1, balance_at_start=False)
        steps = [torch.compile(o.step, backend="eager") if compiled else o.step for o in opts]
        for i in range(3):
            gradients(m, opts, i)
            for step in steps:
                step()
        runs.append(hook.steps)
    assert runs == [3, 3]
    assert_models_close(model, twin)


@pytest.mark.usefixtures("one_process")
def test_a_distributed_data_parallel_model_takes_a_list_of_optimizers():
    model, s = gpt()
    twin = copy.deepcopy(model)
    runs = []
    for m, wrapped in ((model, torch.nn.parallel.DistributedDataParallel(model)), (twin, twin)):
        opts = muon_adamw(m)
        hook = gaugefix.GaugeFixing(opts, wrapped, s, STRENGTH, every=2)
        for i in range(4):
            gradients(wrapped, opts, i)
            for opt in opts:
                opt.step()
        runs.append(hook.steps)
    assert runs == [2, 2]
    assert_models_close(model, twin)
