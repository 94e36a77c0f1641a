"""The imbalance (moment map) ``mu`` and its statistics.

Generator ``n`` acts on entry ``e`` with weight ``w_n(e)`` in ``{-1, 0, 1}``. Its incoming mass
is ``S_in,n = sum_{w_n(e) = 1} theta_e^2``, its outgoing mass ``S_out,n = sum_{w_n(e) = -1}
theta_e^2``; the imbalance is ``mu_n = S_in,n - S_out,n = sum_e w_n(e) theta_e^2`` and
``K_nn = S_n = S_in,n + S_out,n``. The sums come from :func:`gaugefix.kernels.generator_sums` (a
fixed handful of operations per kind of layer), and every function accepts stacks of several
copies of a model (``batch_dims`` leading dims, as the sweep engine trains them). The masses
at a gauge ``h``, for the solvers, are :mod:`gaugefix.masses`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from gaugefix.distributed import local_view, refuse_gathered, sharded
from gaugefix.kernels import cached_on, generator_sums, reduce_to
from gaugefix.structure import GaugeStructure, PlannedParam

__all__ = [
    "accumulation_dtype",
    "accumulation_dtype_of",
    "FLOAT32_LOG_RATIO_CEIL",
    "FLOAT32_MU_NORM_FLOOR",
    "FLOAT32_SUM_FLOOR",
    "imbalance",
    "imbalance_stats",
    "imbalance_stats_tensor",
    "in_out_sums",
    "local_params",
    "out_of_float32_range",
    "pair_shape",
    "refuse_meta",
    "scatter_add_",
    "scatter_terms_",
    "STAT_NAMES",
    "stats_from_sums",
]


def accumulation_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype sums of squares of ``tensors`` accumulate in: float64 when any is float64 (a
    model mixing float16 and float64 layers too), else float32; float64 for none."""
    return accumulation_dtype_of({t.dtype for t in tensors.values()})


def accumulation_dtype_of(dtypes: Collection[torch.dtype]) -> torch.dtype:
    """:func:`accumulation_dtype` of tensors of the given ``dtypes`` (a set, read once)."""
    return torch.float32 if dtypes and torch.float64 not in dtypes else torch.float64


def refuse_meta(tensors: Mapping[str, Tensor]) -> None:
    """``ValueError`` naming the first tensor on the ``meta`` device, which holds no data."""
    for name, t in tensors.items():
        if t.is_meta:
            raise ValueError(
                f"parameter '{name}' is on the meta device (it holds no data): materialize the "
                "model first (model.to_empty(device=...) and load its weights)"
            )


def pair_shape(param: PlannedParam) -> tuple[int, ...]:
    """The broadcast shape of a parameter's term maps: entries that agree on every map (a conv
    kernel's taps) share every factor, so their squares can be summed first."""
    return tuple(torch.broadcast_shapes(*(term.slots.shape for term in param.terms)))


def scatter_add_(out: Tensor, slots: Tensor, values: Tensor) -> None:
    """``out[..., slots[j]] += values[..., j]`` over the flattened ``slots``: the one scatter of
    per-entry sums onto generators. ``out``: ``[*batch, N + 1]``; ``values``: ``[*batch, ...]``
    with as many trailing entries as ``slots``."""
    out.index_add_(-1, slots.reshape(-1), values.reshape(*out.shape[:-1], -1))


def scatter_terms_(
    acc_in: Tensor, acc_out: Tensor, param: PlannedParam, values: Tensor, batch: tuple[int, ...]
) -> None:
    """``acc[..., n] += values`` summed over the entries each term names ``n`` at: into
    ``acc_in`` for terms of sign +1, ``acc_out`` for sign -1. ``values``: ``[*batch, *shape]``
    with ``shape`` broadcast-compatible with every term; ``acc_*``: ``[*batch, N + 1]``."""
    for term in param.terms:
        v = reduce_to(values, (*batch, *term.slots.shape))
        scatter_add_(acc_in if term.sign > 0 else acc_out, term.slots, v)


def in_out_sums(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure
) -> tuple[Tensor, Tensor]:
    """``(S_in, S_out)``, each ``[num_generators]``: the squared masses every generator
    multiplies and divides in ``source`` (a model, or name -> tensor)."""
    tensors = structure.bind(source)
    refuse_meta(tensors)
    s_in, s_out, _ = generator_sums(tensors, structure, accumulation_dtype(tensors))
    return s_in, s_out


def imbalance(source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure) -> Tensor:
    """The imbalance ``mu``, shape ``[num_generators]``: ``mu_n = sum_e w_n(e) theta_e^2``.

    ``source`` is a model or a mapping from parameter names to tensors (so ``imbalance(grads, s)``
    is ``mu(g)``). Accumulated in float64 when any tensor is float64, else in float32.
    Differentiable when the tensors require grad. For FSDP2-sharded (``DTensor``) tensors every
    process returns the whole ``mu``: its slices' sums, completed by one all-reduce (not
    differentiable then).
    """
    params = structure.bind(source, sharded=True)
    refuse_gathered(source, params)  # FSDP2 gathered copies (in the forward's dtype)
    if not sharded(params.values()):
        s_in, s_out = in_out_sums(params, structure)
        return s_in - s_out
    with torch.no_grad():  # the all-reduce completing the sums is not differentiable
        s_in, s_out = in_out_sums(*local_view(params, structure))
    return s_in - s_out


STAT_NAMES = (
    "mu_rel_rms", "mu_rel_max", "log_ratio_rms", "log_ratio_max", "mu_norm", "norm_sq",
    "dead_count", "nonfinite_count",
)  # fmt: skip


def stats_from_sums(
    s_in: Tensor, s_out: Tensor, norm_sq: Tensor, dead_at_most: float = 0.0
) -> Tensor:
    """The statistics of :func:`imbalance_stats`, in the order of :data:`STAT_NAMES`, from
    ``S_in``, ``S_out`` (``[*batch, N]``) and ``||theta||^2`` (``[*batch]``): ``[*batch, 8]``.
    A generator with a non-finite sum makes the ratio statistics non-finite (never healthy).
    ``dead_count`` counts the generators whose smaller side is at most ``dead_at_most`` (0: an
    empty side). About 30 elementwise operations and reductions over ``[*batch, N]``, no host
    read."""
    if s_in.shape[-1] == 0:
        zero = torch.zeros_like(norm_sq)
        return torch.stack([zero, zero, zero, zero, zero, norm_sq, zero, zero], -1)
    mu, s, low = s_in - s_out, s_in + s_out, torch.minimum(s_in, s_out)
    nan_or_zero = s - s  # NaN where S_n is not finite, 0 elsewhere
    live = low > 0  # both sides non-zero (never where a side is NaN)
    counted = s != 0  # (NaN counts)
    # mu_n / S_n (0 where S_n = 0), and 0.5 log(S_in / S_out) where both sides are non-zero,
    # NaN where S_n is not finite, 0 elsewhere; their RMS and largest absolute value
    ratios = torch.stack(
        [
            torch.where(counted, mu / s, nan_or_zero),  # (a subnormal S_n too; NaN stays NaN)
            torch.where(live, torch.xlogy(0.5, s_in / s_out), nan_or_zero),
        ],
        -2,
    )
    # over the generators: S_n != 0 (NaN counts), live, dead (a side at most dead_at_most), not
    # finite (counted in the sums' dtype: the square root of an integer count is taken in float32)
    dead = low <= dead_at_most
    counts = torch.stack([counted, live, dead, nan_or_zero.isnan()], -2).sum(-1, dtype=s.dtype)
    kept, dead_nonfinite = counts.split(2, -1)
    rms = torch.linalg.vector_norm(ratios, dim=-1) / kept.clamp_min(1).sqrt()
    largest = torch.linalg.vector_norm(ratios, ord=math.inf, dim=-1)
    rms_max = torch.stack([rms, largest], -1).flatten(-2)
    mu_norm_sq = torch.stack([torch.linalg.vector_norm(mu, dim=-1), norm_sq], -1)
    return torch.cat([rms_max, mu_norm_sq, dead_nonfinite], -1)


_DEAD_INDEX = STAT_NAMES.index("dead_count")
# The structure's per-device cache (pickled and saved empty) of whether its last float32
# statistics there had a generator with an all-zero side (a dead neuron, which the float32
# statistics always redo in float64): the next call sums in float64 first, and keeps that
# result while such a side remains. It changes the cost, never the statistics.
_FLOAT64_FIRST_ATTR = "_float64_first_on"

FLOAT32_SUM_FLOOR = 2.0**-102  # float32 sums of squares at least this lose at most 2^-150 per
# square that underflows or rounds to a subnormal: k * 2^-48 relative, within float32 rounding
# for sides of up to 2^24 entries
FLOAT32_MU_NORM_FLOOR = 2.0**-51  # sqrt(FLOAT32_SUM_FLOOR): mu_norm^2 is such a sum
FLOAT32_LOG_RATIO_CEIL = 63 * math.log(2)  # 0.5 log(2^126): S_in / S_out within float32's
# normal range, below it the quotient is a subnormal with few bits


def local_params(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure
) -> tuple[dict[str, Tensor], GaugeStructure] | None:
    """The tensors the statistics read, bound and (under FSDP2) this process's slices with
    their structure; ``None`` when the structure acts on none."""
    params = structure.bind(source, sharded=True)
    refuse_gathered(source, params)  # FSDP2 gathered copies (in the forward's dtype)
    if not params:
        return None
    refuse_meta(params)
    return local_view(params, structure)


@torch.no_grad()
def imbalance_stats_tensor(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure
) -> Tensor:
    """The statistics of :func:`imbalance_stats` as one tensor ``[8]`` in the order of
    :data:`STAT_NAMES`, on the parameters' device, without a host read: a training loop can
    keep it (or log it later) without waiting for the device. A fixed number of operations
    whatever the depth (under FSDP2, one all-reduce). Always in the sums' dtype: for a float32
    model the float32 statistics, with the limits of float32's range that
    :func:`imbalance_stats` (which reads them) lifts by redoing the sums in float64."""
    bound = local_params(source, structure)
    if bound is None:
        return torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    params, local = bound
    return stats_from_sums(*generator_sums(params, local, accumulation_dtype(params)))


def out_of_float32_range(values: list[float], generators: int) -> bool:
    """Whether float32 statistics (:data:`STAT_NAMES` order, ``dead_count`` counting sides at
    most :data:`FLOAT32_SUM_FLOOR`) may be corrupted by float32's range: a dead, tiny or
    non-finite generator, a non-finite statistic, a log-ratio whose quotient left float32's
    normal range, or ``norm_sq``, ``mu_norm^2`` below the floor."""
    stats = dict(zip(STAT_NAMES, values, strict=True))
    return (
        not all(map(math.isfinite, values))
        or stats["dead_count"] + stats["nonfinite_count"] > 0
        or stats["log_ratio_max"] >= FLOAT32_LOG_RATIO_CEIL
        or stats["norm_sq"] < FLOAT32_SUM_FLOOR
        or (generators > 0 and stats["mu_norm"] < FLOAT32_MU_NORM_FLOOR)
    )


@torch.no_grad()
def imbalance_stats(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure
) -> dict[str, float]:
    """Cheap imbalance statistics for logging, as Python floats.

    With ``mu = S_in - S_out`` and ``S = S_in + S_out`` (:func:`in_out_sums`):

    - ``mu_rel_rms``, ``mu_rel_max``: RMS and maximum of ``|mu_n| / S_n`` over the generators
      with ``S_n > 0`` (0 for a balanced one, 1 for one whose incoming or outgoing side is zero);
    - ``log_ratio_rms``, ``log_ratio_max``: RMS and maximum of ``|0.5 log(S_in,n / S_out,n)|``
      (the gauge distance to the generator's local balance, up to a factor 2) over the
      generators with both sides non-zero;
    - ``mu_norm``: ``||mu||_2``; ``norm_sq``: ``||theta||^2`` over the parameters the structure
      acts on; ``dead_count``: how many have an empty (all-zero) side (the results of
      ``balance_`` and ``gauge_coordinates`` list them as ``dead_generators``, with the open
      groups of live generators, which zero entries can make and which this count leaves out:
      their test needs the weights' zero pattern read on the host);
    ``nonfinite_count``: how many have a NaN or infinite entry (the four ratio statistics
    are then NaN or infinite, so a diverged model never looks healthy).

    Computed in the sums' dtype (float32 for float32, float16 and bfloat16 models). A float32
    result that float32's range may have corrupted (:func:`out_of_float32_range`: a dead,
    non-finite or tiny generator, a non-finite statistic, a quotient ``S_in,n / S_out,n`` below
    float32's normal range, ``norm_sq`` or ``mu_norm^2`` below ``2^-102``) is redone in float64,
    in which the squares of float32 entries neither overflow nor underflow: the statistics of
    any float32 model are its float64 copy's to float32 rounding, at the cost of a second pass
    over the parameters for such a model only. A dead neuron (a generator with an all-zero side,
    0 in float32 too) always makes it so: after a call that finds one, the next call on the same
    structure sums in float64 first and stops there while such a side remains, one pass instead
    of two (not under FSDP2, where every process takes both). In float64 its range bounds
    them: a quotient beyond ``1.8e308`` gives log-ratio statistics of ``inf``, and ``mu`` above
    its square root a ``mu_norm`` of ``inf``, with ``nonfinite_count`` 0 (kept so: each guard
    would cost operations on every call, against a target of 50 for the whole function).

    Otherwise :func:`imbalance_stats_tensor`'s operations (a fixed number whatever the depth)
    and one device-to-host transfer (one batched ``.tolist()``); keep that tensor instead to
    read it later without waiting for the device (float32 statistics always, unchecked).
    """
    bound = local_params(source, structure)
    if bound is None:
        return dict.fromkeys(STAT_NAMES, 0.0)
    params, local = bound
    if accumulation_dtype(params) != torch.float32:
        return dict(zip(STAT_NAMES, _stats_list(params, local, torch.float64), strict=True))
    wide = None  # under FSDP2 (local is a shard) every process must take the same path: no guess
    first = _float64_first(structure, params)
    if local is structure and first[0]:
        wide = _stats_list(params, local, torch.float64)
        if wide[_DEAD_INDEX] > 0:  # an all-zero side, 0 in float32 too: float32 would redo it
            return dict(zip(STAT_NAMES, wide, strict=True))
    values = _stats_list(params, local, torch.float32, FLOAT32_SUM_FLOOR)
    if out_of_float32_range(values, structure.num_generators):
        values = wide if wide is not None else _stats_list(params, local, torch.float64)
    if local is structure:  # dead_count > 0 only in float64 statistics: an all-zero side
        first[0] = values[_DEAD_INDEX] > 0
    return dict(zip(STAT_NAMES, values, strict=True))


def _float64_first(structure: GaugeStructure, params: Mapping[str, Tensor]) -> list[bool]:
    """Whether the next float32 statistics of ``structure`` on the device of ``params`` sum
    in float64 first: a one-entry list, cached with the structure's plans (never pickled)."""
    device = next(iter(params.values())).device
    return cached_on(structure, _FLOAT64_FIRST_ATTR, device, lambda _: [False])


def _stats_list(
    params: Mapping[str, Tensor], structure: GaugeStructure, dtype: torch.dtype, floor: float = 0.0
) -> list[float]:
    """The statistics (:data:`STAT_NAMES` order) of bound ``params`` with sums in ``dtype``,
    read on the host; ``dead_count`` counts the sides at most ``floor``."""
    return stats_from_sums(*generator_sums(params, structure, dtype), floor).tolist()
