"""What moves with the parameters at an orbit step (``moved_with``): always the tensors the
optimizer and autograd hold now (state made at the first step, state replaced by
``load_state_dict``, gradients made anew after ``zero_grad(set_to_none=True)``, a new parameter
group), with the checks of ``optimizer_states``;
and the caches of the step's host work (``most_terms``, ``sharded``) never stale."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import distributed
from gaugefix.action import moved_with, optimizer_states


def _setup(optimizer=torch.optim.Adam):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    params = structure.bind(model)
    return model, x, params, optimizer(model.parameters(), lr=1e-2)


def _step(model, x, opt, set_to_none=True):
    opt.zero_grad(set_to_none=set_to_none)
    model(x).square().mean().backward()
    opt.step()


def _same(a, b):
    """Two target maps list the very same tensors (by identity) with the same powers."""
    assert list(a) == list(b)
    for name in a:
        assert [(id(t), p) for t, p in a[name]] == [(id(t), p) for t, p in b[name]], name


def _current(params, opt):
    """The tensors that must move, read from the optimizer and the parameters directly."""
    out = {}
    for name, p in params.items():
        state = opt.state.get(p, {})
        moved = [(p, 1)] + ([(p.grad, -1)] if p.grad is not None else [])
        moved += [
            (state[k], -1) for k in ("exp_avg", "momentum_buffer") if state.get(k) is not None
        ]
        moved += [(state[k], -2) for k in ("exp_avg_sq", "max_exp_avg_sq") if k in state]
        out[name] = moved
    return out


def test_state_made_at_the_first_step_is_moved_from_then_on():
    model, x, params, opt = _setup()
    model(x).square().mean().backward()
    before = moved_with(opt, params)
    assert all(len(v) == 2 for v in before.values())  # the parameter and its gradient
    opt.step()
    after = moved_with(opt, params)
    _same(after, _current(params, opt))
    assert all(len(v) == 4 for v in after.values())  # and exp_avg, exp_avg_sq


def test_gradients_made_anew_each_step_are_the_ones_moved():
    model, x, params, opt = _setup()
    _step(model, x, opt)
    first = {name: id(p.grad) for name, p in params.items()}
    kept = moved_with(opt, params)  # holds the old gradients alive: their ids are not reused
    _step(model, x, opt)  # set_to_none: new .grad tensors
    now = moved_with(opt, params)
    assert all(id(p.grad) != first[name] for name, p in params.items())
    _same(now, _current(params, opt))
    assert kept


def test_state_replaced_by_load_state_dict_is_the_one_moved():
    model, x, params, opt = _setup()
    _step(model, x, opt)
    saved = copy.deepcopy(opt.state_dict())
    old = moved_with(opt, params)
    opt.load_state_dict(saved)  # new state tensors, same keys
    now = moved_with(opt, params)
    _same(now, _current(params, opt))
    assert all(now[n][2][0] is not old[n][2][0] for n in params)


def test_a_misshaped_buffer_loaded_later_is_refused_like_optimizer_states():
    model, x, params, opt = _setup()
    _step(model, x, opt)
    moved_with(opt, params)  # passes once
    saved = copy.deepcopy(opt.state_dict())
    first = next(iter(saved["state"]))
    saved["state"][first]["exp_avg"] = torch.zeros(1, dtype=torch.float64)  # same keys
    opt.load_state_dict(saved)
    with pytest.raises(ValueError, match="a buffer not shaped like its parameter") as a:
        moved_with(opt, params)
    with pytest.raises(ValueError) as b:
        optimizer_states(opt, params)
    assert str(a.value) == str(b.value)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("sum", torch.zeros(()), "not a state Adam makes"),
        ("step", torch.zeros(2), "a count that does not hold one number"),
        ("exp_avg", "not a tensor", "a buffer not shaped like its parameter"),
    ],
)
def test_a_key_appearing_after_a_passed_check_is_refused(key, value, why):
    model, x, params, opt = _setup()
    _step(model, x, opt)
    moved_with(opt, params)
    opt.state[next(iter(params.values()))][key] = value
    with pytest.raises(ValueError, match=why) as a:
        moved_with(opt, params)
    with pytest.raises(ValueError) as b:
        optimizer_states(opt, params)
    assert str(a.value) == str(b.value)


def test_a_new_parameter_group_is_moved_with_its_state():
    model, x, params, opt = _setup()
    last = model[2]
    opt = torch.optim.Adam(model[0].parameters(), lr=1e-2)
    _step(model, x, opt)
    assert all(len(moved_with(opt, params)[n]) == 2 for n in params if n.startswith("2."))
    opt.add_param_group({"params": list(last.parameters()), "lr": 3e-2})
    _step(model, x, opt)
    now = moved_with(opt, params)
    _same(now, _current(params, opt))
    assert all(len(now[n]) == 4 for n in params)


def test_sgd_momentum_buffer_none_passes_and_stays_put():
    model, x, params, opt = _setup(torch.optim.SGD)
    _step(model, x, opt)
    for p in params.values():  # as SGD without momentum kept it (torch < 2.4, or loaded)
        opt.state[p]["momentum_buffer"] = None
    _same(moved_with(opt, params), _current(params, opt))


def test_unknown_optimizer_with_state_is_refused():
    model, x, params, opt = _setup(torch.optim.Adamax)
    _step(model, x, opt)
    with pytest.raises(ValueError, match="cannot transport optimizer state 'exp_inf'"):
        moved_with(opt, params)
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        moved_with(object(), params)
    _same(moved_with(None, params), _current(params, torch.optim.SGD([torch.zeros(1)])))


def test_most_terms_is_not_carried_by_a_pickle_or_a_restriction():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    structure = gaugefix.discover(model.double(), torch.randn(5, 3, dtype=torch.float64))
    assert structure.most_terms() == 2  # the middle weight: a row's and a column's
    structure._most = 7  # a stale value: a copy must find its own
    for copied in (pickle.loads(pickle.dumps(structure)), copy.deepcopy(structure)):
        assert copied._most is None and copied.most_terms() == 2
    keep = torch.zeros(structure.num_generators, dtype=torch.bool)
    assert structure.restrict(keep, "test").most_terms() == 0  # no parameter left


def test_sharded_finds_a_dtensor_of_any_subclass_anywhere(monkeypatch):
    class Fake(torch.Tensor):
        pass

    class Sub(Fake):
        pass

    monkeypatch.setattr(distributed, "_dtensor_type", lambda: Fake)
    plain = [torch.zeros(2), nn.Parameter(torch.zeros(2))]
    assert not distributed.sharded(plain)
    assert distributed.sharded([*plain, torch.zeros(1).as_subclass(Fake)])
    assert distributed.sharded(iter([*plain, torch.zeros(1).as_subclass(Sub)]))
    assert not distributed.sharded([])
