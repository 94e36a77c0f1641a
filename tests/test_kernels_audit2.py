"""Second audit of the kernels (``generator_sums``, ``rescale_``) against a dense float64 oracle
built term by term from ``structure.params``, in both layouts (the GPU one taken on CPU
tensors): random structures mixing dtypes, memory layouts (transposed, strided, channels_last,
``as_strided`` with gaps, expanded 0-stride for the sums), zero-size and 0-dim parameters,
stacks of equally shaped parameters with different term maps, restricted structures, batch
dims, tensors around the CPU block size (real and shrunk constants), and ``h`` of ``-0.0``."""

from __future__ import annotations

import math
import pickle
import random
import warnings

import pytest
import torch
from torch import Tensor

from gaugefix import kernels
from gaugefix.structure import GaugeStructure
from gaugefix.structure.terms import ParamTerms, Term

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
EXACT = 1e-12
LAYOUTS = pytest.mark.parametrize("gpu", [False, True], ids=["cpu layout", "gpu layout"])
DTYPES = (D, torch.float32, torch.float16, torch.bfloat16)
# A moved entry of a narrower dtype: within a few of its roundings (factors formed in float32,
# a second moment divided twice in the GPU layout), relative to the exact value.
ROUNDED = {torch.float32: 16 * 2.0**-24, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
SIZES = (0, 1, 2, 3, 5)
SEEDS = range(16)


# --- the oracle --------------------------------------------------------------------------------
def build(n: int, specs: dict[str, tuple[tuple[int, ...], list[tuple[Tensor, int]]]]):
    """A structure of ``n`` generators from ``name -> (shape, [(index, sign), ...])``."""
    params = {
        k: ParamTerms(k, shape, tuple(Term(i, s) for i, s in terms))
        for k, (shape, terms) in specs.items()
    }
    return GaugeStructure(n, params, [], ["x"] * n, ["neuron"] * n, {}, list(params))


def padded(x: Tensor) -> Tensor:
    """``x`` ``[*batch, N]`` with a zero appended (index ``-1`` reads it)."""
    return torch.cat([x.to(D), x.new_zeros((*x.shape[:-1], 1), dtype=D)], -1)


def exponent(s: GaugeStructure, name: str, h: Tensor) -> Tensor:
    """``sum_n w_n(e) h_n`` for every entry of ``name``: ``[*batch, *shape]``, float64."""
    hx, p = padded(h), s.params[name]
    out = torch.zeros((*h.shape[:-1], *p.shape), dtype=D)
    for t in p.terms:
        out = out + t.sign * hx[..., t.index]
    return out


def dense_sums(tensors: dict[str, Tensor], s: GaugeStructure, batch: tuple[int, ...]) -> tuple:
    """``(S_in, S_out, ||theta||^2)`` in float64, entry by entry onto each term's generator."""
    n = s.num_generators
    sums = torch.zeros((*batch, 2, n + 1), dtype=D)
    norm = torch.zeros(batch, dtype=D)
    for name, p in s.params.items():
        sq = tensors[name].detach().to(D).square().reshape(*batch, -1)
        norm += sq.sum(-1)
        for t in p.terms:
            slots = torch.where(t.index < 0, n, t.index).expand(p.shape).reshape(-1)
            sums[..., 0 if t.sign > 0 else 1, :].index_add_(-1, slots, sq)
    return sums[..., 0, :n], sums[..., 1, :n], norm


def relative(actual: Tensor, expected: Tensor) -> float:
    """The largest error over the largest ``|expected|`` (absolute where that is 0)."""
    if not expected.numel():
        return 0.0
    err = float((actual.detach().to(D) - expected).abs().max())
    scale = float(expected.abs().max())
    return err / scale if scale else err


def assert_moved(t: Tensor, old: Tensor, e: Tensor, power: int) -> None:
    """``t == old * exp(power e)`` entry by entry: 1e-12 in float64, a few roundings else."""
    want = old * torch.exp(power * e)
    err = (t.to(D) - want).abs()
    if t.dtype == D:
        assert bool((err <= EXACT * want.abs()).all())
        return
    # relative to each entry, or half the spacing of the subnormals below the smallest normal
    floor = torch.finfo(t.dtype).smallest_normal * torch.finfo(t.dtype).eps
    assert bool((err <= ROUNDED[t.dtype] * want.abs() + floor).all())


# --- random cases --------------------------------------------------------------------------------
def relaid(r: random.Random, values: Tensor, expanded: bool) -> Tensor:
    """``values`` with the same entries in a random memory layout."""
    kinds = ["contiguous", "transposed", "strided", "channels_last", "gaps"]
    kind = r.choice(kinds + ["expanded"] * expanded)
    if values.dim() == 0 or kind == "contiguous":
        return values.clone()
    if kind == "transposed":
        order = list(range(values.dim()))[::-1]
        return values.permute(order).contiguous().permute(order)
    if kind == "strided":
        wide = torch.zeros((*values.shape[:-1], 2 * values.shape[-1] + 1), dtype=values.dtype)
        wide[..., 1::2] = values
        return wide[..., 1::2]
    if kind == "channels_last" and values.dim() == 4:
        return values.contiguous(memory_format=torch.channels_last)
    if kind == "expanded" and values.shape[-1]:
        return values.narrow(-1, 0, 1).expand(values.shape)
    strides, size = [], 1
    for d in reversed(values.shape):
        strides.insert(0, size)
        size *= d + 1
    out = torch.zeros(2 * size + 3, dtype=values.dtype).as_strided(values.shape, strides, 3)
    return out.copy_(values)


def random_specs(r: random.Random, n: int) -> dict:
    """Shapes of rank 0 to 4 (sizes 0 included); per shape, 1 to 3 terms varying along random
    dims (rows, columns, both, none), shared by up to 5 parameters with different maps."""
    specs, g = {}, torch.Generator().manual_seed(r.randrange(1 << 30))
    for _ in range(r.randint(1, 6)):
        shape = tuple(r.choice(SIZES + (8,)) for _ in range(r.choice([0, 1, 2, 2, 3, 4])))
        pattern = [
            (tuple(d if r.random() < 0.6 else 1 for d in shape), r.choice([1, -1]))
            for _ in range(r.randint(1, 3))
        ]
        for _ in range(r.choice([1, 1, 2, 3, 5])):
            terms = [(torch.randint(-1, n, dims, generator=g), sign) for dims, sign in pattern]
            specs[f"p{len(specs)}"] = (shape, terms)
    return specs


def random_case(seed: int, batch_dims: int, expanded: bool = False, restrict: bool = False):
    """``(structure, tensors, h, batch)``: random parameters of random dtypes and layouts."""
    r = random.Random(seed)
    n = r.randint(1, 8)
    s = build(n, random_specs(r, n))
    if restrict:
        keep = torch.tensor([r.random() < 0.5 for _ in range(n)])
        keep[r.randrange(n)] = True
        s = s.restrict(keep, "restricted")
    batch = tuple(r.choice([1, 2, 3]) for _ in range(batch_dims))
    g = torch.Generator().manual_seed(seed)
    tensors = {
        name: relaid(r, torch.randn((*batch, *p.shape), generator=g, dtype=D).to(dtype), expanded)
        for name, p in s.params.items()
        for dtype in [r.choice(DTYPES)]
    }
    h = 0.5 * torch.randn((*batch, s.num_generators), generator=g, dtype=D)
    return s, tensors, h, batch


def random_targets(seed: int, tensors: dict[str, Tensor]) -> dict:
    """Each parameter (power 1), maybe a gradient (-1) and a second moment (-2) of random dtypes
    and layouts; some parameters left out (nothing of theirs moves)."""
    r = random.Random(seed + 1)
    targets = {}
    for name, t in tensors.items():
        if r.random() < 0.15:
            continue
        moved = [(t, 1)]
        for power in (-1, -2):
            if r.random() < 0.6:
                values = torch.rand(t.shape, dtype=D).add_(0.1).to(r.choice(DTYPES))
                moved.append((relaid(r, values, False), power))
        targets[name] = moved
    return targets


# --- squared sums --------------------------------------------------------------------------------
def assert_sums(s: GaugeStructure, tensors: dict, batch: tuple[int, ...]) -> None:
    """The kernel's sums equal the oracle's (no tensors: no batch, zeros)."""
    got = kernels.generator_sums(tensors, s, D, len(batch))
    batch = batch if tensors else ()
    for actual, expected in zip(got, dense_sums(tensors, s, batch), strict=True):
        assert actual.shape == expected.shape
        assert relative(actual, expected) <= EXACT


@LAYOUTS
@pytest.mark.parametrize("batch_dims", [0, 1, 2])
@pytest.mark.parametrize("seed", SEEDS)
def test_sums_are_the_dense_sums(seed, batch_dims, gpu, monkeypatch):
    """Mixed dtypes (also within one stack), every layout (expanded ones too), zero-size and
    0-dim parameters, stacks with different maps, batch dims: 1e-12 of the oracle."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    s, tensors, _, batch = random_case(seed, batch_dims, expanded=True)
    assert_sums(s, tensors, batch)


@LAYOUTS
@pytest.mark.parametrize("seed", SEEDS)
def test_sums_of_a_restricted_structure(seed, gpu, monkeypatch):
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    s, tensors, _, batch = random_case(seed, 1, restrict=True)
    assert_sums(s, tensors, batch)


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("seed", SEEDS)
def test_sums_in_small_blocks_of_rows(seed, chunk, monkeypatch):
    """The CPU layout's blocks of rows and reused buffers on small tensors: several blocks and
    a remainder block, a buffer of a few entries."""
    monkeypatch.setattr(kernels, "CHUNK", chunk)
    monkeypatch.setattr(kernels, "SHORT_RUN", 2)
    monkeypatch.setattr(kernels, "SCRATCH_MIN", 1)
    monkeypatch.setattr(kernels._scratch, "buffers", {}, raising=False)
    s, tensors, _, batch = random_case(seed, seed % 2, expanded=True)
    assert_sums(s, tensors, batch)


@LAYOUTS
@pytest.mark.parametrize("seed", range(8))
def test_sums_are_differentiable_exactly(seed, gpu, monkeypatch):
    """With a gradient recorded: the gradient of ``<a, S_in> + <b, S_out> + c ||theta||^2`` is
    ``2 theta_e (c + sum_t (a or b)[slot_t(e)])`` entry by entry."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    s, tensors, _, batch = random_case(seed, 1)
    tensors = {k: v.detach().to(D).requires_grad_(True) for k, v in tensors.items()}
    n, g = s.num_generators, torch.Generator().manual_seed(seed)
    a, b = (torch.randn((*batch, n), generator=g, dtype=D) for _ in range(2))
    c = torch.randn(batch, generator=g, dtype=D)
    s_in, s_out, norm = kernels.generator_sums(tensors, s, D, 1)
    ((s_in * a).sum() + (s_out * b).sum() + (norm * c).sum()).backward()
    for name, p in s.params.items():
        coefficient = c.reshape(*batch, *[1] * len(p.shape)).expand(*batch, *p.shape)
        for t in p.terms:
            coefficient = coefficient + padded(a if t.sign > 0 else b)[..., t.index]
        want = 2 * tensors[name].detach() * coefficient
        got = tensors[name].grad if tensors[name].grad is not None else torch.zeros_like(want)
        assert relative(got, want) <= EXACT, name


# --- the action ---------------------------------------------------------------------------------
def assert_rescaled(s: GaugeStructure, tensors: dict, h: Tensor, seed: int, batch_dims: int):
    targets = random_targets(seed, tensors)
    if not targets:
        return
    saved = [(name, t, t.detach().to(D).clone(), p) for name, ts in targets.items() for t, p in ts]
    kernels.rescale_(targets, s, h, batch_dims)
    for name, t, old, power in saved:
        assert_moved(t, old, exponent(s, name, h), power)


@LAYOUTS
@pytest.mark.parametrize("batch_dims", [0, 1, 2])
@pytest.mark.parametrize("seed", SEEDS)
def test_rescale_is_the_dense_action(seed, batch_dims, gpu, monkeypatch):
    """Parameters, gradients and second moments of mixed dtypes and layouts, some parameters
    not moved: each entry times ``exp(power sum_n w_n(e) h_n)``, 1e-12 in float64."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    s, tensors, h, _ = random_case(seed, batch_dims)
    assert_rescaled(s, tensors, h, seed, batch_dims)


@LAYOUTS
@pytest.mark.parametrize("seed", SEEDS)
def test_rescale_of_a_restricted_structure(seed, gpu, monkeypatch):
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    s, tensors, h, _ = random_case(seed, 1, restrict=True)
    assert_rescaled(s, tensors, h, seed, 1)


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("seed", SEEDS)
def test_rescale_in_small_blocks_of_rows(seed, chunk, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", chunk)
    monkeypatch.setattr(kernels, "SHORT_RUN", 2)
    monkeypatch.setattr(kernels, "SCRATCH_MIN", 1)
    monkeypatch.setattr(kernels._scratch, "buffers", {}, raising=False)
    s, tensors, h, _ = random_case(seed, seed % 2)
    assert_rescaled(s, tensors, h, seed, seed % 2)


@LAYOUTS
@pytest.mark.parametrize("seed", range(8))
def test_h_of_negative_zeros_moves_nothing(seed, gpu, monkeypatch):
    """``h = -0.0`` everywhere: every factor is ``exp(-0.0) = 1``, every tensor unchanged bit
    for bit (inf, -0.0 and subnormal entries included; NaN stays NaN)."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    s, tensors, h, _ = random_case(seed, 1)
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-40, -5e-324], dtype=D)
    for t in tensors.values():
        k = min(t.numel(), special.numel())
        t[torch.unravel_index(torch.arange(k), t.shape)] = special[:k].to(t.dtype)
    targets = random_targets(seed, tensors)
    before = [(t, t.clone()) for ts in targets.values() for t, _ in ts]
    kernels.rescale_(targets, s, torch.full_like(h, -0.0), 1)
    for t, old in before:
        assert torch.equal(t.isnan(), old.isnan())
        bits = [
            x.nan_to_num(0.0, math.inf, -math.inf).contiguous().view(-1).view(torch.uint8)
            for x in (t, old)
        ]
        assert torch.equal(*bits)


# --- around the CPU block size -------------------------------------------------------------------
# Shapes just below, at and above CHUNK = 2^18 entries (odd row counts: a remainder block), three
# blocks and a remainder, and a conv weight above it; batch 2 of one below it.
LARGE = {
    "below": ((), (511, 513)),
    "at": ((), (512, 512)),
    "above": ((), (513, 512)),
    "odd rows": ((), (1025, 257)),
    "three blocks": ((), (1543, 512)),
    "conv": ((), (181, 163, 3, 3)),
    "batch": ((2,), (511, 509)),
}
# Terms by the dims their maps vary along (rows, columns, both, none) and their signs.
MAPS = {
    "rows and columns": [((0,), 1), ((1,), -1)],
    "per entry": [((0, 1), 1)],
    "all three": [((0,), 1), ((1,), -1), ((0, 1), 1)],
    "none and rows": [((), -1), ((0,), 1)],
}


def large_case(batch: tuple, shape: tuple, maps: list, dtype: torch.dtype, layout: str):
    """Two parameters of ``shape`` (one stack) with different maps, and one of another shape;
    ``strided``: matrices transposed, conv weights channels_last."""
    g = torch.Generator().manual_seed(0)
    n, specs = 9, {}
    for k in range(2):
        terms = []
        for dims, sign in maps:
            sizes = tuple(d if i in dims else 1 for i, d in enumerate(shape))
            terms.append((torch.randint(-1, n, sizes, generator=g), sign))
        specs[f"w{k}"] = (shape, terms)
    specs["b"] = ((shape[0],), [(torch.randint(-1, n, (shape[0],), generator=g), -1)])
    s = build(n, specs)
    tensors = {}
    for name, p in s.params.items():
        values = torch.randn((*batch, *p.shape), generator=g, dtype=D).to(dtype)
        if layout == "strided" and values.dim() == 4:
            values = values.contiguous(memory_format=torch.channels_last)
        elif layout == "strided" and values.dim() >= 2:
            values = values.mT.contiguous().mT
        tensors[name] = values
    return s, tensors, 0.3 * torch.randn((*batch, n), generator=g, dtype=D)


@LAYOUTS
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("maps", list(MAPS))
@pytest.mark.parametrize("size", list(LARGE))
def test_tensors_around_the_block_size(size, maps, layout, gpu, monkeypatch):
    """Sums (float32 parameters accumulated in float64) and moves (float64, 1e-12) of tensors
    around CHUNK entries, with the real block size and buffers."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    batch, shape = LARGE[size]
    s, tensors, h = large_case(batch, shape, MAPS[maps], torch.float32, layout)
    assert_sums(s, tensors, batch)
    tensors = {name: t.to(D) for name, t in tensors.items()}
    targets = {name: [(t, 1), (t.detach().abs() + 0.5, -2)] for name, t in tensors.items()}
    saved = [(name, t, t.clone(), p) for name, ts in targets.items() for t, p in ts]
    kernels.rescale_(targets, s, h, len(batch))
    for name, t, old, power in saved:
        assert_moved(t, old, exponent(s, name, h), power)


# --- zero-size parameters with factors of several shapes -----------------------------------------
@pytest.mark.parametrize(
    "gpu, dtype, shape",
    [(True, torch.bfloat16, (0, 3)), (False, torch.float32, (0, 20000)), (False, D, (20000, 0))],
    ids=["gpu layout bfloat16", "cpu layout row of 20000", "cpu layout column of 20000"],
)
def test_zero_size_parameter_with_row_and_column_factors(gpu, dtype, shape, monkeypatch):
    """The product of a row factor ``[0, 1]`` and a column factor ``[1, C]`` has shape
    ``[0, C]``; it was written into an output of shape ``[1, C]`` (the larger size per dim),
    which ``torch.mul(out=)`` resized with a deprecation warning (an error in a later PyTorch),
    in the GPU layout for bfloat16 (a fresh output) and in the CPU layout from the reused
    buffer. Now the broadcast shape: no warning, nothing moves, the buffer stays whole."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    rows, cols = ((shape[0], 1), (1, shape[1]))
    s = build(2, {"w": (shape, [(torch.zeros(rows, dtype=torch.long), 1),
                                (torch.ones(cols, dtype=torch.long), -1)])})  # fmt: skip
    w = torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.rescale_({"w": [(w, 1), (torch.empty(shape, dtype=dtype), -2)]}, s, torch.ones(2))
    assert w.shape == shape
    buffers = getattr(kernels._scratch, "buffers", {})
    assert all(b.shape == (kernels.CHUNK,) for b in buffers.values())


# --- the plan cache ------------------------------------------------------------------------------
def test_a_pickled_structure_carries_no_kernel_plans():
    """``GaugeStructure`` pickles without its per-device plans (tensors on devices the
    unpickling process may lack: a plan built on CUDA, unpickled on a CPU-only machine, raised
    ``Attempting to deserialize object on a CUDA device``), but the kernels' plans rode along
    (``_kernel_plans``, on the structure for ``torch.compile``). Now pickled empty; the
    unpickled structure builds its own and sums the same."""
    s, tensors, _, batch = random_case(0, 0)
    before = kernels.generator_sums(tensors, s, D)
    again = pickle.loads(pickle.dumps(s))
    assert not getattr(again, "_kernel_plans", None)
    for a, b in zip(kernels.generator_sums(tensors, again, D), before, strict=True):
        assert torch.equal(a, b)
