"""The tracer walks each op's arguments once (``scan``): it lists the tensors in the order
``nested_tensors`` gives, and tells whether a number in them may carry a mark (a number computed
from a size or from tensor values, a float recorded as computed from a size, a slice's bounds).
Where it says none may, the tracer skips ``from_size``, ``from_value`` and the slice bounds: those
must then all find nothing. Checked on random nested arguments against the full walks."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaugefix.structure.marks import (
    FLOATS_FROM_SIZES,
    SizedFloat,
    SizedInt,
    ValuedFloat,
    ValuedInt,
    from_size,
    from_value,
    scan,
)
from gaugefix.structure.provenance import nested_tensors
from gaugefix.structure.trace import _slice_tensors

TENSORS = [torch.zeros(2), torch.ones(3, dtype=torch.float64), torch.nn.Parameter(torch.ones(1))]
RECORDED = 0.25  # a float recorded as computed from a size


def _leaves() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(TENSORS),
        st.none(),
        st.integers(-5, 5),
        st.booleans(),
        st.floats(-2, 2),
        st.just(RECORDED),
        st.sampled_from(["mean", "...", torch.float32, torch.device("cpu"), Ellipsis]),
        st.integers(0, 9).map(SizedInt),
        st.integers(0, 9).map(ValuedInt),
        st.floats(0, 2).map(SizedFloat),
        st.floats(0, 2).map(ValuedFloat),
        st.complex_numbers(max_magnitude=2),
    )


def _slices(items: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(items, items, items).map(lambda t: slice(*t))


ARGUMENTS = st.recursive(
    _leaves(),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.sampled_from("abcd"), inner, max_size=3),
        st.lists(st.integers(0, 9), max_size=3).map(torch.Size),
        _slices(inner),
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(args=st.lists(ARGUMENTS, max_size=4).map(tuple), kwargs=st.dictionaries(
    st.sampled_from(["dim", "out", "value", "fill_value"]), ARGUMENTS, max_size=3))  # fmt: skip
def test_one_walk_finds_what_the_separate_walks_find(args, kwargs):
    call = (args, kwargs)
    FLOATS_FROM_SIZES.floats = {id(RECORDED): RECORDED}
    try:
        tensors: list = []
        maybe_marked = scan(call, tensors)
        assert [id(t) for t in tensors] == [id(t) for t in nested_tensors(call)]
        if not maybe_marked:
            assert not from_size(call)
            assert not from_value(call)
            assert not list(_slice_tensors(args))
            assert not any(isinstance(leaf, slice) for leaf in _flat(call))
    finally:
        FLOATS_FROM_SIZES.floats = None


def _flat(tree):
    """Every leaf and container of ``tree``."""
    yield tree
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _flat(item)


def test_every_kind_of_mark_and_a_slice_is_seen():
    FLOATS_FROM_SIZES.floats = {id(RECORDED): RECORDED}
    try:
        for leaf in (SizedInt(3), ValuedInt(2), SizedFloat(0.5), ValuedFloat(1.5), RECORDED,
                     slice(None, 2), 0.5):  # fmt: skip
            tensors: list = []
            assert scan(((TENSORS[0], [1, (None, leaf)]), {"dim": 0}), tensors), leaf
            assert tensors == [TENSORS[0]]
        tensors = []
        assert not scan(((TENSORS[0], [1, (None, True, "x")], torch.Size([2])), {}), tensors)
    finally:
        FLOATS_FROM_SIZES.floats = None
