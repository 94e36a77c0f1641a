"""The sides a parameter's terms put their components on (``_mark_sides_and_squares``, part of
compiling every discovered structure): terms along different dims of a weight (its rows and its
columns) are compared on their distinct components, never broadcast to the weight's shape (a
GPT-2 embedding's 38.6M entries took a second of every discovery), with the same result."""

import torch

from gaugefix.structure.compilation import _mark_sides_and_squares

ROWS, COLS = 1_000_000, 1_000_000  # a weight of 1e12 entries: never to be materialised


def _marked(terms: list[tuple[torch.Tensor, int]], components: int) -> tuple:
    has_in = torch.zeros(components, dtype=torch.bool)
    has_out = torch.zeros(components, dtype=torch.bool)
    reason = torch.full((components,), 9)
    _mark_sides_and_squares(terms, has_in, has_out, reason, 1)
    return has_in, has_out, reason


def test_rows_and_columns_of_a_huge_weight_are_marked_without_its_shape():
    rows = torch.arange(ROWS).reshape(-1, 1) % 7  # components 0..6 along dim 0
    cols = 7 + torch.arange(COLS).reshape(1, -1) % 5  # components 7..11 along dim 1
    has_in, has_out, reason = _marked([(rows, 1), (cols, -1)], 12)
    assert has_in.tolist() == [True] * 7 + [False] * 5
    assert has_out.tolist() == [False] * 7 + [True] * 5
    assert reason.tolist() == [9] * 12


def test_a_component_carried_with_both_signs_at_one_entry_is_on_neither_side():
    rows = torch.tensor([[0], [1], [2]])  # entry [i, j] multiplies component i ...
    cols = torch.tensor([[0, 3]])  # ... and divides component 0 or 3
    has_in, has_out, _ = _marked([(rows, 1), (cols, -1)], 4)
    # component 0 cancels at [0, 0] but moves at [0, 1] (multiplied) and [1, 0] (divided)
    assert has_in.tolist() == [True, True, True, False]
    assert has_out.tolist() == [True, False, False, True]
    single = _marked([(torch.tensor([[0]]), 1), (torch.tensor([[0]]), -1)], 1)
    assert single[0].tolist() == single[1].tolist() == [False]  # cancels everywhere
