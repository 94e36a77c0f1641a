"""Adam, separated: the penalty inside Adam (its gradient added to the loss gradient, so it
passes through Adam's preconditioner) against the decoupled penalty (its vertical step taken
after Adam's update) and the exact orbit step, at a matched rate of imbalance decay. Per step,
the horizontal (function-changing) part of what the fixing adds to Adam's update, the
effective step size and Adam's second-moment inflation; and, from the sweep, the paired
verdicts of the decoupled penalty against the penalty. Stored per task under
``adam_split/TASK``."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, TypedDict

import torch

import gaugefix
from gaugefix.diagnostics import relaxation_rates
from gaugefix.experiments import stability
from gaugefix.experiments.cells import MethodKey, SKey, TaskKey, group, longest_full_batch, s_key
from gaugefix.experiments.engine import (
    DIVERGENCE_FACTOR,
    RunConfig,
    group_step,
    init_direction,
    optimizers,
    run_stats,
    task_hash,
)
from gaugefix.experiments.figures import fmt, method_color, save, subplots, task_style
from gaugefix.experiments.probes import float64_model
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import Task
from gaugefix.step import AdamState

__all__ = [
    "KEY",
    "READS_RUNS",
    "VERSION",
    "COMPARED",
    "SPLIT",
    "S",
    "PENALTY_STRENGTH",
    "PILOT_STRENGTH",
    "PILOT_STEP",
    "MATCH_ROUNDS",
    "HORIZONTAL_FLOOR",
    "PairKey",
    "AdamSplit",
    "SUMMARY",
    "compute",
    "trajectory",
    "decay_rate",
    "matched_strengths",
    "horizontal_fraction",
    "sweep_verdicts",
    "summarize",
    "render",
]

KEY = "adam_split"
# compute reads the sweep's runs (plain Adam's edge, the sweep's verdicts): computed after
# the sweep
READS_RUNS = True
# The version of what compute gives: raised when a change alters it, so stored values of
# older versions are computed again.
# 2: Adam's state kept between steps; 3: plain's rate from the longest regime; 4: the sweep's
# grid tops and unreached seeds as the headline's, an infinite initial loss diverged at step 0
VERSION = 4
SPLIT = ("penalty", "decoupled-penalty", "exact")  # the fixings compared, each against plain
S = 2.0  # the initial imbalance of the trajectories
PENALTY_STRENGTH = 0.1  # the in-Adam penalty's (the quick grid's); the others are matched to it
PILOT_STRENGTH = 1.0  # the decoupled penalty's and the exact step's first try, at most
PILOT_STEP = 0.5  # and at most this lr * strength * (the fastest relaxation rate 2 k_max)
MATCH_ROUNDS = 2  # secant steps of the matching
# The figure's log axis draws a horizontal fraction below this (0 included) at it, and says so.
HORIZONTAL_FLOOR = 1e-17
# The sweep's paired comparisons reported here: (method, reference).
COMPARED = (
    ("penalty", "plain"),
    ("decoupled-penalty", "plain"),
    ("penalty", "balanced-init"),
    ("decoupled-penalty", "balanced-init"),
    ("decoupled-penalty", "penalty"),
)


PairKey = Annotated[str, "METHOD/REFERENCE"]


class AdamSplit(TypedDict):
    """One task's ``adam_split`` entry (:func:`summarize`)."""

    lr: float
    strength: Annotated[dict[MethodKey, float], "per fixing, as matched"]
    decay_rate: Annotated[
        dict[MethodKey, float | None],
        "per method, of the RMS log-ratio per matching step",
    ]
    horizontal: Annotated[
        dict[MethodKey, float | None],
        "per fixing, the mean of |Pi_H (u - u_plain)| / |u_plain|",
    ]
    step_inflation: Annotated[
        dict[MethodKey, float | None],
        "per fixing, the mean of |u| / |u_plain|: the effective step",
    ]
    v_inflation: Annotated[
        dict[MethodKey, float | None], "per fixing, mean sqrt(v) over plain's at the last step"
    ]
    sweep: Annotated[
        dict[PairKey, dict[SKey, stability.RatioStats]], "the sweep's paired edge ratios (Adam)"
    ]


SUMMARY = dict[TaskKey, AdamSplit]


def compute(store: Store, task: Task, quick: bool) -> dict[str, Any]:
    """The trajectories at plain's largest stable Adam rate at ``s = S`` (seed 0; 0.01 without
    runs), 40 (quick) or 150 steps, strengths matched over the first 10 (quick) or 20; and
    the sweep's verdicts."""
    steps, match = (40, 10) if quick else (150, 20)
    lr = _plain_adam_edge(store, task) or 0.01
    strengths = matched_strengths(task, lr, match)
    curves = {m: trajectory(task, m, strengths.get(m, 0.0), lr, steps) for m in ("plain", *SPLIT)}
    return {
        "lr": lr,
        "steps": steps,
        "match_steps": match,
        "strength": strengths,
        "decay_rate": {m: decay_rate(c, match) for m, c in curves.items()},
        "curves": curves,
        "sweep": sweep_verdicts(store, task),
    }


def _plain_adam_edge(store: Store, task: Task) -> float | None:
    """Plain's largest stable full-batch Adam rate at ``s = S`` on the task's instance 0, in
    the longest full-batch Adam regime (the one :func:`sweep_verdicts` reads)."""
    task_hash = TaskSpec(task.name).hash()
    runs = store.runs(task=task.name, task_hash=task_hash, seed=0, method="plain",
                      optimizer="adam", batch_size=0, s=S)  # fmt: skip
    found = longest_full_batch(runs, task_hash)
    return (stability.max_stable_lr(found[1]) or None) if found else None


def _model(task: Task) -> tuple[torch.nn.Module, gaugefix.GaugeStructure]:
    model, structure = float64_model(task)
    gaugefix.apply_gauge_(model, structure, S * init_direction(structure))
    return model, structure


def _adam_state(state: Any) -> AdamState:
    """The Adam state nested in a :func:`group_step` state."""
    if isinstance(state, AdamState):
        return state
    found = [_adam_state(s) for s in state if isinstance(s, tuple)]
    return next(s for s in found if s is not None) if found else None


def trajectory(
    task: Task, method: str, strength: float, lr: float, steps: int, measure: bool = True
) -> dict:
    """Full-batch Adam on one float64 network from the initialisation moved by ``S z``, every
    step the sweep's (:func:`group_step` for ``method``); at each step ``t``: the loss, the RMS
    log-ratio, ``|u|`` and ``|u_plain|`` over ``lr`` (``u``: the step's change of the
    parameters; ``u_plain``: Adam's update alone from the same parameters, gradient and state),
    the horizontal fraction ``|Pi_H (u - u_plain)| / |u_plain|`` (:func:`horizontal_fraction`,
    with ``measure``) and the mean of ``sqrt(v)``. Lists by key; a loss above
    :data:`DIVERGENCE_FACTOR` times the initial one, or not finite, ends it."""
    model, structure = _model(task)
    x, y, _, _ = task.arrays(torch.float64)
    stack = {n: p.detach().unsqueeze(0) for n, p in model.named_parameters()}  # views of model
    config = RunConfig(task.name, method, "adam", lr, strength, S, 0, 0, steps, "float64",
                       task_hash=task_hash(task))  # fmt: skip
    rate = torch.tensor([lr], dtype=torch.float64)
    step_fn = group_step(structure, [config], "adam", rate, torch.tensor([True]))
    state = step_fn.init(stack)
    keys = ("loss", "log_ratio", "step", "plain_step", "horizontal", "sqrt_v")
    out: dict[str, list[float]] = {k: [] for k in keys}
    initial = task.loss(model(x), y).item()
    for _ in range(steps):
        loss = task.loss(model(x), y)
        value = loss.item()
        if not (math.isfinite(value) and value <= DIVERGENCE_FACTOR * initial):
            break  # a NaN, or an infinite initial loss (diverged at step 0 in the sweep)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        grads = {n: g.unsqueeze(0) for n, g in zip(stack, grads, strict=True)}
        before = {n: p.clone() for n, p in stack.items()}
        plain_state = copy.deepcopy(_adam_state(state))
        u_plain, _ = optimizers("adam", rate).update(
            {n: g.clone() for n, g in grads.items()}, plain_state, stack
        )
        with torch.no_grad():
            out["log_ratio"].append(float(run_stats(structure, stack)[0]))
            _, state = step_fn.update(grads, state, stack)  # Adam's step count moves on
        u = {n: stack[n] - before[n] for n in stack}
        out["loss"].append(value)
        out["step"].append(_norm(u) / lr)
        out["plain_step"].append(_norm(u_plain) / lr)
        if measure:
            out["horizontal"].append(horizontal_fraction(model, structure, before, u, u_plain))
        v = _adam_state(state).exp_avg_sq
        out["sqrt_v"].append(float(torch.cat([t.sqrt().flatten() for t in v.values()]).mean()))
    return out


def _norm(vectors: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([v.flatten() for v in vectors.values()]).norm())


def horizontal_fraction(
    model: torch.nn.Module,
    structure: gaugefix.GaugeStructure,
    at: dict[str, torch.Tensor],
    u: dict[str, torch.Tensor],
    u_plain: dict[str, torch.Tensor],
) -> float | None:
    """``|Pi_H (u - u_plain)| / |u_plain|`` at the parameters ``at`` (``[1, *shape]``):
    :func:`gaugefix.project` of what the fixing added to the update onto the orthogonal
    complement of the orbit directions, relative to the plain update; ``None`` where the
    generators' Gram matrix is singular or too ill-conditioned to solve to ``project``'s
    tolerance (dead neurons), or the plain update is 0. ``model`` is left at its parameters."""
    now = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(at[n][0])
        added = {n: (u[n] - u_plain[n])[0] for n in u}
        try:
            horizontal = gaugefix.project(added, model, structure, onto="horizontal")
        except (RuntimeError, ValueError):  # an ill-conditioned or singular Gram matrix
            horizontal = None
        for n, p in params.items():
            p.copy_(now[n])
    return None if horizontal is None else _ratio(_norm(horizontal), _norm(u_plain))


def decay_rate(curve: dict[str, list[float]], steps: int) -> float | None:
    """The decay per step of the RMS log-ratio over the first ``k = steps`` steps (fewer where
    the run ended sooner): ``-log(r_k / r_0) / k``; ``None`` for a run that took no step, or
    where ``r_0`` or ``r_k`` is 0 (an exactly balanced network: no finite rate)."""
    r = curve["log_ratio"]
    k = min(steps, len(r) - 1)
    return -math.log(r[k] / r[0]) / k if k > 0 and r[0] > 0 and r[k] > 0 else None


def matched_strengths(task: Task, lr: float, steps: int) -> dict[str, float]:
    """The penalty at :data:`PENALTY_STRENGTH`; the decoupled penalty and the exact step at the
    strength whose decay rate (:func:`decay_rate` over ``steps``) equals the penalty's, by
    :data:`MATCH_ROUNDS` secant steps from plain's rate (strength 0) and the rate at a pilot
    strength (to first order the extra decay is linear in the strength: ``mu <- (I - 2 lr
    strength K) mu``). The pilot is :data:`PILOT_STRENGTH`, or less where ``lr * strength *
    2 k_max`` would exceed :data:`PILOT_STEP` (the explicit vertical step is unstable above 2);
    the secant stops where a decay is not measured, does not grow with the strength or the next
    guess leaves ``(0, 4 x`` the largest strength tried``]``; the strength tried whose decay is
    nearest the penalty's is taken."""
    model, structure = _model(task)
    fastest = float(relaxation_rates(model, structure, 1.0).rates.max())
    pilot = min(PILOT_STRENGTH, PILOT_STEP / (lr * fastest))

    def measured(method: str, strength: float) -> float | None:
        return decay_rate(trajectory(task, method, strength, lr, steps + 1, measure=False), steps)

    plain, target = measured("plain", 0.0), measured("penalty", PENALTY_STRENGTH)
    out = {"penalty": PENALTY_STRENGTH}
    for m in ("decoupled-penalty", "exact"):
        points = [(0.0, plain), (pilot, measured(m, pilot))]
        for _ in range(MATCH_ROUNDS):
            (s0, r0), (s1, r1) = points[-2:]
            if None in (r0, r1, target) or (r1 - r0) * (s1 - s0) <= 0:
                break
            guess = s1 + (target - r1) * (s1 - s0) / (r1 - r0)
            if not 0 < guess <= 4 * max(st for st, _ in points):
                break
            points.append((guess, measured(m, guess)))
        tried = [(st, r) for st, r in points[1:] if r is not None]
        found = bool(tried) and target is not None
        out[m] = min(tried, key=lambda p: abs(p[1] - target))[0] if found else pilot
    return out


def sweep_verdicts(store: Store, task: Task) -> dict[str, dict[str, Any]]:
    """The sweep's paired ratios of stable edges for :data:`COMPARED` in the task's full-batch
    Adam regime (its longest), by s: :func:`stability.seed_ratios` of each seed's bisected
    edge, each method at its best strength, judged on the seeds no strength was chosen on when
    either is tuned, against the grid tops and with the unreached seeds the headline's
    ``expansion_ratio`` uses."""
    runs = store.runs(task=task.name, optimizer="adam", batch_size=0)
    if (found := longest_full_batch(runs, TaskSpec(task.name).hash())) is None:
        return {}
    regime_runs = found[1]
    cells = group(stability.at_best_strength(regime_runs), lambda c: (c.method, c.s))
    tops, unreached = stability.grid_bounds(cells)  # as the headline's
    edges: dict[str, dict[str, dict[int, float]]] = {}
    for (m, s), rs in cells.items():
        edges.setdefault(m, {})[s_key(s)] = stability.stable_edges(rs)
    tuned = stability.tuned_methods(regime_runs)
    out: dict[str, dict[str, Any]] = {}
    for method, ref in COMPARED:
        if method in edges and ref in edges:
            by_s = stability.pair_ratios(edges, tops, tuned, unreached, method, ref)
            if by_s:
                out[f"{method}/{ref}"] = by_s
    return out


def _ratio(x: float, y: float) -> float | None:
    """``x / y``; ``None`` where ``y`` is 0 (not measured)."""
    return x / y if y else None


def _ratios(a: list[float], b: list[float]) -> list[float | None]:
    """:func:`_ratio` step by step, over the steps both reached."""
    return [_ratio(x, y) for x, y in zip(a, b, strict=False)]


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values measured (``None`` where none is)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarize(values: dict[str, dict[str, Any]]) -> dict[str, AdamSplit]:
    """Per task: the rate, matched strengths and decay rates, each fixing's mean horizontal
    fraction and step inflation over its steps, its second-moment inflation at the last step
    both it and plain reached, and the sweep's verdicts."""
    out = {}
    for task, v in sorted(values.items()):
        c, plain = v["curves"], v["curves"]["plain"]
        last = {m: min(len(c[m]["sqrt_v"]), len(plain["sqrt_v"])) - 1 for m in SPLIT}
        out[task] = AdamSplit(
            lr=v["lr"],
            strength=v["strength"],
            decay_rate=v["decay_rate"],
            horizontal={m: _mean(c[m]["horizontal"]) for m in SPLIT},
            step_inflation={m: _mean(_ratios(c[m]["step"], c[m]["plain_step"])) for m in SPLIT},
            v_inflation={
                m: _ratio(c[m]["sqrt_v"][last[m]], plain["sqrt_v"][last[m]])
                if last[m] >= 0
                else None
                for m in SPLIT
            },
            sweep=v["sweep"],
        )
    return out


def _verdicts(sweep: dict[str, dict[str, Any]], method: str) -> list[bool | None]:
    """The verdicts of ``method`` against plain and balanced-init at every s in the sweep."""
    return [
        st["held"] for ref in ("plain", "balanced-init")
        for st in sweep.get(f"{method}/{ref}", {}).values()
    ]  # fmt: skip


def render(out: Path, values: dict[str, dict[str, Any]]) -> str:
    summary = summarize(values)
    fig, axes = subplots(1, 3, figsize=(12, 3.6), layout="constrained")
    lines = []
    for i, (task, v) in enumerate(sorted(values.items())):
        e = summary[task]
        _, ls = task_style(i)
        for m in SPLIT:
            c = v["curves"][m]
            style = {"color": method_color(m), "ls": ls, "label": f"{task}: {m}"}
            axes[0].semilogy(c["log_ratio"], **style)
            axes[1].semilogy(
                [max(h, HORIZONTAL_FLOOR) if h is not None else math.nan for h in c["horizontal"]],
                **style,
            )
            inflation = _ratios(c["sqrt_v"], v["curves"]["plain"]["sqrt_v"])
            axes[2].semilogy([math.nan if r is None else r for r in inflation], **style)
        axes[0].semilogy(v["curves"]["plain"]["log_ratio"], color=method_color("plain"), ls=ls,
                         label=f"{task}: plain")  # fmt: skip
        per = "; ".join(
            f"{m} (strength {fmt(e['strength'][m])}, decay {fmt(e['decay_rate'][m])}/step): "
            f"horizontal {fmt(e['horizontal'][m])}, step x{fmt(e['step_inflation'][m])}, "
            f"sqrt(v) x{fmt(e['v_inflation'][m])}"
            for m in SPLIT
        )
        lines.append(
            f"- {task}, full-batch Adam at lr {fmt(e['lr'])} from s = {S:g} (plain decays the "
            f"RMS log-ratio by {fmt(e['decay_rate']['plain'])}/step): {per}."
        )
        lines += _floored(task, v["curves"])
        lines.append(_sweep_text(task, e["sweep"]))
    axes[0].set_ylabel("RMS log-ratio")
    axes[1].set_ylabel("|Pi_H (u - u_plain)| / |u_plain|")
    axes[2].set_ylabel("mean sqrt(v) / plain's")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    name = save(fig, out, "adam-split.png")
    return (
        "## Adam, separated\n\nThe penalty inside Adam (its gradient passes through Adam's "
        "preconditioner) against the decoupled penalty (its vertical step, `-lr strength sum_n "
        "mu_n xi_n`, taken after Adam's update, as AdamW decouples weight decay) and the exact "
        "orbit step. The decoupled and exact strengths are matched to the penalty's decay of "
        "the RMS log-ratio over the first steps (a secant through plain's decay and the decay "
        "at a pilot strength: 1, or less where the explicit vertical step would be "
        "unstable). *Horizontal* is the part of what the fixing adds to Adam's update "
        "(`u - u_plain`, `u_plain` Adam's update alone from the same state) orthogonal to the "
        "orbit directions, relative to `|u_plain|`: it changes the function at first order; "
        "the decoupled step's is zero by construction, the exact step's second order. *Step*: "
        "the mean over the steps of `|u| / |u_plain|`; *sqrt(v)*: the mean of Adam's `sqrt(v)` "
        "over plain's run's, at the last step both reached.\n\n"
        + "\n".join(lines)
        + f"\n\n![adam split]({name})"
    )


def _floored(task: str, curves: dict[str, dict[str, list]]) -> list[str]:
    """A line per fixing with horizontal fractions below :data:`HORIZONTAL_FLOOR`, which the
    figure draws at the floor."""
    below = {m: sum(h is not None and h < HORIZONTAL_FLOOR for h in curves[m]["horizontal"])
             for m in SPLIT}  # fmt: skip
    return [
        f"- {task}, {m}: {n} horizontal {'fraction' if n == 1 else 'fractions'} below "
        f"{HORIZONTAL_FLOOR:g} (0 included), "
        f"drawn at {HORIZONTAL_FLOOR:g} on the figure's log axis."
        for m, n in below.items()
        if n
    ]


def _sweep_text(task: str, sweep: dict[str, dict[str, Any]]) -> str:
    """The sweep's verdicts in words, and whether only the in-Adam penalty helps."""
    if not sweep:
        return f"- {task}: no full-batch Adam runs of the sweep to compare."
    parts = [
        f"{pair}: "
        + ", ".join(
            f"s = {float(s):g} {stability.ratio_text(st)} ({stability.VERDICT[st['held']]})"
            for s, st in sorted(by_s.items())
        )  # fmt: skip
        for pair, by_s in sweep.items()
    ]
    pen, dec = _verdicts(sweep, "penalty"), _verdicts(sweep, "decoupled-penalty")
    if True in dec:
        verdict = "The decoupled (vertical) penalty held against a reference"
    elif True in pen and dec and None not in dec:
        verdict = (
            "**Only the in-Adam penalty helps**: its gain does not come from relaxing the "
            "imbalance by a vertical step, so it is not the paper's mechanism"
        )
    elif True in pen:
        verdict = (
            "The in-Adam penalty held against a reference; whether the decoupled one helps "
            "could not be measured everywhere"
        )
    else:
        verdict = _none_held_text(pen, dec)
    return f"- {task}, sweep (Adam, edge ratios per seed): " + "; ".join(parts) + f". {verdict}."


def _none_held_text(pen: list[bool | None], dec: list[bool | None]) -> str:
    """The verdict in words where neither penalty held against a reference at any s: a penalty
    without a measured verdict is said not measured, and verdicts not measured are counted."""
    verdicts = {"in-Adam": pen, "decoupled": dec}
    unknown = [name for name, v in verdicts.items() if all(h is None for h in v)]
    if len(unknown) == 2:
        return (
            "Whether the in-Adam or the decoupled penalty held against a reference could not "
            "be measured"
        )
    if unknown:
        (known,) = set(verdicts) - set(unknown)
        where = _where_measured(verdicts[known])
        return (
            f"The {known} penalty did not hold against a reference{where}; whether the "
            f"{unknown[0]} one helps could not be measured"
        )
    return (
        "Neither the in-Adam nor the decoupled penalty held against a reference"
        + _where_measured(pen + dec)
    )


def _where_measured(verdicts: list[bool | None]) -> str:
    """`` where measured (k of the n verdicts could not be measured)``; empty where k is 0."""
    k = verdicts.count(None)
    return (
        f" where measured ({k} of the {len(verdicts)} verdicts could not be measured)" if k else ""
    )
