"""Inputs on which discovery used to crash, hang or answer wrongly: each is now traced exactly
(a random gauge of scale 2 keeps the float64 outputs to 1e-10) or refused with a one-line
:class:`gaugefix.TracingError`."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10


class MLP(nn.Module):
    """``b(mid(relu(a(x))))``: the 6 hidden units of ``a`` are its generators."""

    def __init__(self, mid: nn.Module | None = None) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.mid = mid if mid is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.mid(F.relu(self.a(x))))


def example() -> Tensor:
    return torch.randn(5, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(0))


def exact(model: nn.Module, *args, **kwargs) -> gaugefix.GaugeStructure:
    """Discover ``model``, apply a random gauge of scale 2 and check the outputs held."""
    with torch.no_grad():
        before = model(*args, **kwargs)
    s = gaugefix.discover(model, *args, **kwargs)
    gaugefix.random_gauge_(model, s, 2.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        after = model(*args, **kwargs)
    assert torch.allclose(after, before, rtol=TOL, atol=TOL)
    return s


def refused(model: nn.Module, *args, **kwargs) -> str:
    """The one-line message of the TracingError discovery raises."""
    with pytest.raises(gaugefix.TracingError) as err:
        gaugefix.discover(model, *args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# --- a scalar slice of a vector parameter ------------------------------------------------------
class SliceOfVector(MLP):
    def __init__(self, op) -> None:
        super().__init__()
        self.op, self.g = op, nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.op(F.relu(self.a(x)), self.g[1]))


@pytest.mark.parametrize("op", [torch.mul, torch.add, lambda h, g: h * g, lambda h, g: h + g])
def test_a_scalar_slice_of_a_vector_parameter_is_traced(op):
    """``h * g[1]`` gathers a 0-d slice of ``g``: its nodes used to be expanded to an empty
    shape with ``expand()``, whose TypeError a dunder turned into "unsupported operand"."""
    torch.manual_seed(0)
    exact(SliceOfVector(op).double(), example())


def test_a_failing_rule_is_named_not_hidden_as_the_model_failing():
    """A rule that raises (here a TypeError inside ``*``, which Python would read as
    NotImplemented) is reported as gaugefix's rule failing, in one line."""

    def broken(ctx, result, input, other):
        raise TypeError("boom")

    def forward(h: Tensor) -> Tensor:
        return h * 2.0

    model = MLP(Lambda(forward)).double()
    message = refused(model, example(), rules=[(torch.Tensor.mul, broken)])
    assert "rule" in message and "boom" in message and "unsupported operand" not in message


class Lambda(nn.Module):
    def __init__(self, f) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)


# --- torch.compile ------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_submodule() -> nn.Module:
    return MLP(torch.compile(nn.ReLU()))


def _compiled_fullgraph() -> nn.Module:
    return MLP(torch.compile(nn.ReLU(), fullgraph=True))


def _compiled_function() -> nn.Module:
    return MLP(Lambda(torch.compile(lambda h: F.relu(h) * 2)))


def _compiled_whole() -> nn.Module:
    return torch.compile(MLP())


def _compiled_in_place() -> nn.Module:
    model = MLP()
    model.a.compile()
    return model


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(
    "make",
    [_compiled_submodule, _compiled_fullgraph, _compiled_function, _compiled_whole,
     _compiled_in_place],
    ids=["submodule", "fullgraph", "function", "whole", "Module.compile"],
)  # fmt: skip
def test_compiled_code_is_traced_eagerly(make):
    """Dynamo used to compile the tracer's own bookkeeping (or crash on it): compiled modules
    and functions now run eagerly under the trace, which sees every op."""
    torch.manual_seed(0)
    s = exact(make().double(), example())
    assert s.num_generators == 6


# --- errors: one line ---------------------------------------------------------------------------
class RaisesLong(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise ValueError("first line\nsecond line\nthird line")


def test_a_multi_line_error_is_reported_in_one_line():
    model = nn.Sequential(nn.Linear(4, 4), RaisesLong()).double()
    message = refused(model, example())
    assert "first line" in message and "'1'" in message


def test_parameters_created_in_inference_mode_are_refused():
    with torch.inference_mode():
        model = MLP().double()
    assert "inference_mode" in refused(model, example())


def test_uninitialized_lazy_parameters_are_refused():
    model = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.Linear(6, 3)).double()
    assert "'0.weight'" in refused(model, example())
    assert nn.parameter.is_lazy(model[0].weight)  # the model is left as it was


class InferenceBuffer(MLP):
    def __init__(self) -> None:
        super().__init__()
        with torch.inference_mode():
            self.register_buffer("c", torch.full((6,), 2.0, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.a(x)) * self.c)


def test_a_buffer_created_in_inference_mode_is_refused_cleanly():
    """Autograd cannot save it; restoring the buffers afterwards used to crash on it too."""
    refused(InferenceBuffer().double(), example())


def test_nested_tensors_are_refused():
    nested = torch.nested.nested_tensor(
        [torch.randn(2, 4, dtype=DTYPE), torch.randn(3, 4, dtype=DTYPE)], layout=torch.jagged
    )
    assert "nested" in refused(MLP().double(), nested)


# --- hooks --------------------------------------------------------------------------------------
class Skip(Exception):
    pass


class Optional(MLP):
    """Falls back to ReLU when ``mid`` refuses to run."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        try:
            h = self.mid(h)
        except Skip:
            pass
        return self.b(h)


def _skip(module, args):
    raise Skip


@pytest.mark.parametrize("where", ["module", "global"])
def test_a_pre_hook_that_raises_and_is_caught_keeps_the_module_path(where):
    """A pre-hook that raises before the tracer's own: the tracer's post-hook (always called)
    used to pop a module path it never pushed ("pop from empty list")."""
    torch.manual_seed(0)
    model = Optional(nn.Tanh()).double()
    if where == "module":
        handle = model.mid.register_forward_pre_hook(_skip)
    else:
        handle = nn.modules.module.register_module_forward_pre_hook(
            lambda m, a: _skip(m, a) if isinstance(m, nn.Tanh) else None
        )
    try:
        assert exact(model, example()).num_generators == 6
    finally:
        handle.remove()


def test_a_caught_pre_hook_of_a_module_with_a_rule():
    """The module's rule is never entered, so it must not be left either."""
    torch.manual_seed(0)
    model = Optional(nn.Tanh()).double()
    model.mid.register_forward_pre_hook(_skip)

    def tanh_blocks(ctx, result, input):
        return ctx.block_all((input,), {}, ctx.reason("tanh"))

    with torch.no_grad():
        before = model(example())
    s = gaugefix.discover(model, example(), rules=[(nn.Tanh, tanh_blocks)])
    assert s.num_generators == 6
    gaugefix.random_gauge_(model, s, 2.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(example()), before, rtol=TOL, atol=TOL)


# --- constants that share a parameter's memory ------------------------------------------------
class Aliased(MLP):
    """Reads ``a.bias`` through a tensor that shares its memory, as if it were a constant:
    a gauge that rescales ``a.bias`` in place changes it too."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.double()
        alias = self.a.bias.detach()
        if how == "buffer":
            self.register_buffer("c", alias)
        elif how == "attribute":
            self.c = alias
        else:
            self.c = alias[:3]

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.a(x))) * self.c[:3]


@pytest.mark.parametrize("how", ["buffer", "attribute", "view"])
def test_a_constant_sharing_a_parameters_memory_fixes_it(how):
    torch.manual_seed(0)
    s = exact(Aliased(how), example())
    assert "a.bias" in " ".join(e.reason for e in s.excluded)


# --- gradients ----------------------------------------------------------------------------------
class BackwardInside(MLP):
    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if torch.is_grad_enabled():
            y.sum().backward(retain_graph=True)
        return y


def test_a_backward_inside_the_forward_leaves_the_gradients_alone():
    model = BackwardInside().double()
    model.b.weight.grad = torch.ones_like(model.b.weight)
    grad = model.b.weight.grad
    assert gaugefix.discover(model, example()).num_generators == 6
    assert model.a.weight.grad is None
    assert model.b.weight.grad is grad and bool((grad == 1).all())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_gradient_penalty_inside_the_forward_is_exact():
    class Penalised(MLP):
        def forward(self, x: Tensor) -> Tensor:
            with torch.enable_grad():
                x = x.clone().requires_grad_(True)
                y = super().forward(x)
                (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
            return y + g.pow(2).sum()

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact(Penalised().double(), example())


def test_a_meta_model_is_refused_before_tracing():
    """Meta tensors have no memory and no values, which the trace reads (aliases, zeros, rows
    picked by data): a meta model is refused with one line naming its first meta parameter."""
    model = MLP().double().to("meta")
    x = torch.empty(5, 4, dtype=DTYPE, device="meta")
    with pytest.raises(ValueError, match="'a.weight' is on the meta device"):
        gaugefix.discover(model, x)


def test_a_forward_keyword_named_model_is_an_example_input():
    """``discover``'s own ``model`` is positional-only: a forward that takes ``model=`` gets it."""

    class Takes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x))) * model

    structure = gaugefix.discover(Takes(), torch.randn(2, 3), model=torch.ones(2, 1))
    assert structure.num_generators == 4


def test_an_integer_parameter_is_fixed_and_the_rest_moves_exactly():
    """An integer parameter read as a factor (``y * k[0]``) cannot store ``exp(h)``: it is fixed
    (it took a generator before, on which ``random_gauge_`` crashed)."""

    class Counted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
            self.k = nn.Parameter(torch.tensor([2, 3]), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x))) * self.k[0]

    model, x = Counted().double(), torch.randn(5, 3, dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    assert "k" not in structure.params and structure.num_generators == 4
    with torch.no_grad():
        before = model(x)
        gaugefix.random_gauge_(model, structure, scale=2.0)
        assert float((model(x) - before).abs().max()) <= 1e-12 * float(before.abs().max())
