"""Second audit of ``GaugeStructure`` bound to models: wrappers and prefixed names, saved
structures on other models, other instances and widths, restricted subgroups, tied weights and
shared submodules, re-registered parameters, hand-counted summaries, pickling. Every kept
symmetry is checked on the function: float64 outputs after a random gauge to 1e-12."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import DTYPE
from gaugefix import GaugeStructure, zoo

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-12
SCALE = 1.0  # of the random gauges: factors around e^{+-1}


def mlp(widths: tuple[int, ...] = (3, 5, 4, 2), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.mlp(widths).double()


def x_for(model: nn.Module) -> Tensor:
    first = next(p for p in model.parameters() if p.dim() == 2)
    return torch.randn(6, first.shape[1], dtype=DTYPE, generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k].detach(), v) for k, v in before.items())


def assert_exact_after_random_gauge(
    model: nn.Module, structure: GaugeStructure, *inputs: Tensor, target: nn.Module | None = None
) -> None:
    """``random_gauge_(target or model, structure)`` moves the parameters (factors far from 1)
    and leaves ``model``'s float64 outputs equal to 1e-12 (relative to their size)."""
    with torch.no_grad():
        before = model(*inputs)
    params = snapshot(model)
    h = gaugefix.random_gauge_(
        target if target is not None else model, structure, SCALE, torch.Generator().manual_seed(7)
    )
    assert float(h.abs().max()) > 0.5
    moved = max(float((v.detach() - params[k]).abs().max()) for k, v in model.named_parameters())
    assert moved > 1e-3
    with torch.no_grad():
        after = model(*inputs)
    assert float((after - before).abs().max()) <= EXACT * float(before.abs().max())


def one_line_error(error: type[Exception], fn, *args, match: str | None = None) -> str:
    with pytest.raises(error, match=match) as info:
        fn(*args)
    assert len(str(info.value).splitlines()) == 1
    return str(info.value)


# --- touching, bind's arguments ------------------------------------------------------------------
def test_touching_refuses_one_string_for_a_collection_of_names():
    """``touching("12.weight")`` tested ``name in "12.weight"`` (substrings): it named the
    generators of ``2.weight`` too, which act on neither ``12.weight`` nor anything it reads."""
    model = mlp((3, 4, 4, 4, 4, 4, 4, 2))
    s = gaugefix.discover(model, x_for(model))
    assert not bool(s.touching({"12.weight"})[:4].any())  # 2.weight's outputs: 4 .. 7
    one_line_error(TypeError, s.touching, "12.weight", match="collection")
    assert torch.equal(s.touching(["12.weight"]), s.touching({"12.weight"}))


@pytest.mark.parametrize("batch_dims", [-1, True, 1.5, "0"])
def test_bind_refuses_a_batch_dims_that_is_not_a_count(batch_dims):
    """``batch_dims=-1`` compared ``shape[-1:]``, and said "has shape (5, 3), expected (5, 3)";
    ``True`` counted as 1."""
    model = mlp()
    s = gaugefix.discover(model, x_for(model))
    error = TypeError if isinstance(batch_dims, bool | float | str) else ValueError
    one_line_error(error, s.bind, model, batch_dims, match="batch_dims")
    assert list(s.bind(model, 0)) == list(s.params)


# --- wrappers and prefixed names -----------------------------------------------------------------
def test_discover_through_torch_compile_gives_the_compiled_models_structure():
    """A structure names the parameters inside a ``torch.compile`` wrapper (as ``GaugeFixing``
    does): it used to name ``_orig_mod.*``, which ``GaugeFixing`` given the wrapper refused,
    while the bare model's structure was refused by ``random_gauge_`` given the wrapper."""
    model = zoo.GPT(vocab=16, dim=8, heads=2, tied=True).double().eval()
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    plain = gaugefix.discover(model, ids)
    wrapped = torch.compile(model)
    assert gaugefix.discover(wrapped, ids).to_dict() == plain.to_dict()
    assert_exact_after_random_gauge(model, plain, ids, target=wrapped)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = gaugefix.GaugeFixing(optimizer, wrapped, gaugefix.discover(wrapped, ids), strength=1.0)
    assert hook.active.num_generators == plain.num_generators


def test_discover_through_data_parallel_gives_the_wrapped_models_structure():
    """``discover`` traces the model a ``DataParallel`` (or DDP) wrapper holds, under its own
    names, as ``GaugeFixing`` binds it: it named ``module.*``, which ``GaugeFixing`` given that
    same wrapper refused. Functions moving a model still take the replica, not the wrapper."""
    model = mlp()
    x = x_for(model)
    wrapped = nn.DataParallel(model)
    structure = gaugefix.discover(wrapped, x)
    assert structure.to_dict() == gaugefix.discover(model, x).to_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = gaugefix.GaugeFixing(optimizer, wrapped, structure, strength=1.0)
    assert hook.active.num_generators == structure.num_generators
    before = snapshot(model)
    one_line_error(ValueError, gaugefix.random_gauge_, wrapped, structure, 1.0, match="module.")
    assert_unchanged(model, before)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_fsdp_wrapped_module."])
def test_a_prefixed_state_dict_is_refused_naming_the_prefix(prefix):
    """A state dict saved from a wrapper carries its prefix: refused in one line that names
    it, nothing read or changed."""
    model = mlp()
    s = gaugefix.discover(model, x_for(model))
    state = {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}
    saved = {k: v.clone() for k, v in state.items()}
    text = one_line_error(ValueError, gaugefix.imbalance, state, s, match="does not match")
    assert repr(prefix) in text
    assert all(torch.equal(v, saved[k]) for k, v in state.items())


def test_a_ddp_like_name_prefix_on_a_module_is_refused_naming_it():
    """A module whose parameters carry a prefix the structure's lack (a wrapper not looked
    through, such as FSDP1's): refused naming the prefix, nothing moved."""
    model = mlp()
    s = gaugefix.discover(model, x_for(model))
    outer = nn.Module()
    outer._fsdp_wrapped_module = model
    before = snapshot(model)
    text = one_line_error(ValueError, gaugefix.random_gauge_, outer, s, SCALE)
    assert "'_fsdp_wrapped_module.'" in text
    assert_unchanged(model, before)


# --- saved structures, other instances, other widths ---------------------------------------------
class Renamed(nn.Module):
    def __init__(self, inner: nn.Sequential) -> None:
        super().__init__()
        self.fc0, self.fc2, self.fc4 = inner[0], inner[2], inner[4]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc4(F.relu(self.fc2(F.relu(self.fc0(x)))))


def others(model: nn.Sequential) -> dict[str, nn.Module]:
    extra = copy.deepcopy(model)
    extra.register_parameter("gain", nn.Parameter(torch.ones((), dtype=DTYPE)))
    missing = copy.deepcopy(model)
    missing[4].bias = None
    reshaped = copy.deepcopy(model)
    reshaped[2] = nn.Linear(5, 4, bias=True).double()
    reshaped[2].weight = nn.Parameter(torch.randn(4, 5, 1, dtype=DTYPE))
    return {
        "renamed": Renamed(copy.deepcopy(model)),
        "extra": extra,
        "missing": missing,
        "reshaped": reshaped,
        "wider": mlp((3, 6, 4, 2)),
        "deeper": mlp((3, 5, 4, 4, 2)),
    }


@pytest.mark.parametrize("which", ["renamed", "extra", "missing", "reshaped", "wider", "deeper"])
def test_a_loaded_structure_refuses_another_model_in_one_line(which, tmp_path):
    model = mlp()
    path = tmp_path / "s.json"
    gaugefix.discover(model, x_for(model)).save(path)
    s = GaugeStructure.load(path)
    other = others(model)[which]
    before = snapshot(other)
    for fn, args in (
        (gaugefix.random_gauge_, (other, s, SCALE)),
        (gaugefix.balance_, (other, s)),
        (gaugefix.imbalance, (other, s)),
    ):
        one_line_error(ValueError, fn, *args, match="does not match")
    assert_unchanged(other, before)


def test_a_loaded_structure_is_exact_on_a_second_instance(tmp_path):
    """Discovered on one instance, saved, loaded, used on another of the same architecture
    (other weights, float32 then moved to float64): exact."""
    first = mlp(seed=0)
    gaugefix.discover(first.float(), x_for(first).float()).save(tmp_path / "s.json")
    second = mlp(seed=1)
    assert not torch.equal(first[0].weight.double(), second[0].weight)
    assert_exact_after_random_gauge(second, GaugeStructure.load(tmp_path / "s.json"), x_for(second))


def test_replaced_and_re_registered_parameters_are_bound_by_name():
    """A parameter replaced by a new one of the same shape, and one deleted and registered
    again (so the model lists it last): the structure acts on the model's current tensors."""
    model = mlp()
    s = gaugefix.discover(model, x_for(model))
    model[2].weight = nn.Parameter(torch.randn(4, 5, dtype=DTYPE))
    weight = model[0].weight
    del model[0].weight
    model[0].register_parameter("weight", nn.Parameter(weight.detach().clone()))
    assert [n for n, _ in model.named_parameters()][:2] == ["0.bias", "0.weight"]
    bound = s.bind(model)
    assert bound["2.weight"] is model[2].weight and bound["0.weight"] is model[0].weight
    assert_exact_after_random_gauge(model, s, x_for(model))


# --- restrict ------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["touching", "not touching"])
def test_restrict_to_generators_touching_a_subset_keeps_them_whole(side):
    """Generators touching ``2.weight`` also act on ``0.weight`` and ``4.weight``: kept, they
    keep every term (outside the subset too), and the restricted group is exact."""
    model = mlp((3, 5, 4, 4, 2))
    s = gaugefix.discover(model, x_for(model))
    touched = s.touching({"2.weight"})
    keep = touched if side == "touching" else ~touched
    r = s.restrict(keep, "left out")
    assert 0 < r.num_generators < s.num_generators
    old = torch.nonzero(keep).reshape(-1).tolist()
    assert all(r.generator(n) == s.generator(o) for n, o in enumerate(old))
    assert_exact_after_random_gauge(model, r, x_for(model))


def test_restrict_of_a_transformer_keeps_exact_symmetries():
    model = zoo.GPT(vocab=16, dim=8, heads=2, tied=True).double().eval()
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    s = gaugefix.discover(model, ids)
    for names in ({"blocks.0.attn.qkv.weight"}, {"blocks.1.fc.weight", "wte.weight"}):
        r = s.restrict(s.touching(names), "left out")
        assert r.num_generators == int(s.touching(names).sum()) > 0
        assert_exact_after_random_gauge(model, r, ids)


# --- tied weights, shared submodules -------------------------------------------------------------
def hf_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, activation_function="relu"
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_hf_gpt2_with_tied_embeddings_is_exact():
    model = hf_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    s = gaugefix.discover(model, ids)
    assert "lm_head.weight" not in s.param_order and "transformer.wte.weight" in s.param_order

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x).logits

    assert_exact_after_random_gauge(Logits(), s, ids, target=model)


class Shared(nn.Module):
    """One square layer applied twice, and a second path through the same first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))
        return self.out(F.relu(self.mid(F.relu(self.mid(h)))) + h)


def test_a_shared_submodule_is_exact():
    torch.manual_seed(0)
    model = Shared().double()
    x = torch.randn(6, 3, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    assert s.num_generators > 0
    assert_exact_after_random_gauge(model, s, x)


# --- summary against a hand count ----------------------------------------------------------------
def summary_rows(s: GaugeStructure) -> dict[str, tuple[int, int]]:
    lines = s.summary().splitlines()
    rows = lines[2 : lines.index(lines[1], 2)]
    return {r.split()[0]: (int(r.split()[1]), int(r.split()[2])) for r in rows}


def test_summary_counts_of_an_mlp_and_a_cnn_by_hand():
    model = mlp((3, 5, 4, 2))
    s = gaugefix.discover(model, x_for(model))
    assert summary_rows(s) == {"0": (5, 5), "2": (4, 4), "4": (0, 0)}
    assert s.summary().splitlines()[-1].startswith("9 generators (9 neuron) over 5 parameters")
    torch.manual_seed(0)
    cnn = zoo.cnn().double()  # conv 8, conv 16, hidden 32; the 10 outputs excluded
    s = gaugefix.discover(cnn, torch.randn(2, 3, 16, 16, dtype=DTYPE))
    assert summary_rows(s) == {"0": (8, 8), "3": (16, 16), "7": (32, 32), "9": (0, 0)}
    assert "10 producing channels excluded" in s.summary()
    r = s.restrict(torch.arange(56) >= 8, "left out")  # conv 0's channels dropped
    assert summary_rows(r)["0"] == (0, 0) and "8 excluded: left out" in r.summary()


# --- pickling, deepcopy --------------------------------------------------------------------------
def test_pickles_leave_out_the_device_plans():
    """A structure's per-device plans are a cache: a pickle of a structure planned on a device
    (CUDA on a machine that has one) must load where that device is missing."""
    model = mlp()
    s = gaugefix.discover(model, x_for(model))
    size = len(pickle.dumps(s))
    s.plan("cpu")
    assert len(pickle.dumps(s)) == size
    copied = pickle.loads(pickle.dumps(s))
    assert copied.to_dict() == s.to_dict()
    assert_exact_after_random_gauge(model, copied, x_for(model))
    twin = copy.deepcopy(model)
    assert_exact_after_random_gauge(twin, copy.deepcopy(s), x_for(twin))
