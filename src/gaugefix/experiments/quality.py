"""What the methods cost or buy in the trained network: final training loss, test loss and test
accuracy at the learning rates stable for both the method and the reference (s = 0), and the
expressivity check (balancing a trained plain network leaves its function unchanged)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Annotated, Any, TypedDict

from gaugefix.experiments.cells import (
    LrKey,
    MethodKey,
    Runs,
    group,
    lr_key,
    median_of_every_seed,
    reference,
)
from gaugefix.experiments.engine import RunResult
from gaugefix.experiments.figures import fmt, methods_in_order
from gaugefix.experiments.stability import VERDICT

__all__ = ["QualitySummary", "render", "render_task", "summarize", "summarize_task", "TaskQuality"]


class Medians(TypedDict):
    """A metric's medians over seeds at the learning rates stable for both a method and the
    reference (s = 0)."""

    reference: Annotated[str, "plain, else balanced-init"]
    medians: dict[MethodKey, dict[LrKey, float]]


class QualitySummary(TypedDict, total=False):
    """The metrics of the trained networks of a regime (:func:`summarize`); a metric no run
    has (no test split, no classes) is left out."""

    final_train_loss: Medians
    final_test_loss: Medians
    test_accuracy: Medians


class _BalanceChange(TypedDict):
    balance_function_change: Annotated[
        float | None, "largest relative output change of balancing a trained plain network"
    ]


class TaskQuality(_BalanceChange, total=False):
    """The expressivity check of a task (:func:`summarize_task`)."""

    balance_unmeasured: Annotated[
        int, "plain networks that finished training whose output change when balanced is not finite"
    ]


# The largest relative output change of balancing under which the function is unchanged
# (float64 rounding).
FUNCTION_CHANGE_TOL = 1e-10

# The summary's metrics of a trained network, each read from a run's result.
METRICS: dict[str, Callable[[RunResult], float | None]] = {
    "final_train_loss": lambda r: r.final_loss,
    "final_test_loss": lambda r: r.test_loss,
    "test_accuracy": lambda r: r.test_accuracy,
}


def _compared(cells: dict[tuple, list[RunResult]], ref: str | None) -> set[tuple]:
    """The ``(method, lr)`` cells whose every seed is stable, as is every seed of the
    reference's cell at ``lr``, run on the same seeds (so their medians compare)."""

    def seeds(key: tuple) -> set[int]:
        return {r.config.seed for r in cells.get(key, [])}

    stable = {key for key, cell in cells.items() if all(r.status == "stable" for r in cell)}
    return {
        (method, lr)
        for method, lr in stable
        if (ref, lr) in stable and seeds((method, lr)) == seeds((ref, lr))
    }


def summarize(runs: Runs) -> QualitySummary:
    """Per metric, method and learning rate stable for every seed of both the method and the
    regime's reference (plain, else balanced-init), run on the same seeds, at s = 0: the
    median over seeds, keyed by :func:`lr_key` (two rates of a method equal to its 6 digits:
    ``ValueError``); a rate where some seed lacks the metric (a NaN test loss, stored as
    ``None``) is left out of it. A metric no run has (no test split, no classes) is left out.
    ``runs``: one regime's at best strength."""
    cells = group([r for r in runs if r.config.s == 0.0], lambda c: (c.method, c.lr))
    ref = reference(runs)
    compared = _compared(cells, ref)
    _check_keys(cells)
    out = QualitySummary()
    for key, metric in METRICS.items():
        values: dict[str, dict[str, float]] = defaultdict(dict)
        for (method, lr), cell in cells.items():
            v = median_of_every_seed([metric(r) for r in cell])
            if (method, lr) in compared and v is not None:
                values[method][lr_key(lr)] = v
        if any(values.values()):
            out[key] = Medians(reference=ref, medians=dict(values))
    return out


def _check_keys(cells: dict[tuple, list[RunResult]]) -> None:
    """``ValueError`` where two learning rates of one method share a :func:`lr_key` (equal to
    its 6 digits): the summary keys medians by it, and one would silently replace the other."""
    keys: dict[tuple[str, str], float] = {}
    for method, lr in cells:
        other = keys.setdefault((method, lr_key(lr)), lr)
        if other != lr:
            raise ValueError(
                f"learning rates {other!r} and {lr!r} of {method} are equal to 6 digits, which "
                "the summary keys rates by: run rates that differ in their first 6 digits"
            )


def summarize_task(runs: Runs) -> TaskQuality:
    """The expressivity check of a task: the largest relative output change of balancing a
    trained plain network (``None`` when none was measured), and how many plain networks that
    finished training have no finite change (a NaN change is stored as ``None``)."""
    changes = [r.balance_change for r in runs if r.balance_change is not None]
    unmeasured = sum(
        r.config.method == "plain" and r.final_loss is not None and r.balance_change is None
        for r in runs
    )
    return TaskQuality(
        balance_function_change=max(changes, default=None), balance_unmeasured=unmeasured
    )


def render(entry: dict[str, Any], label: Any) -> str:
    """The final-loss paragraph of one regime (``label(method)``: a method with its strength)."""
    if "final_train_loss" not in entry:
        return ""
    ref, loss = entry["final_train_loss"]["reference"], entry["final_train_loss"]["medians"]
    lines = []
    accuracy = entry["test_accuracy"]["medians"] if "test_accuracy" in entry else {}
    for method in methods_in_order(m for m in loss if m != ref):
        pairs = [(v, loss[ref][lr]) for lr, v in loss[method].items() if lr in loss[ref]]
        ratios = [v / p for v, p in pairs if p]
        if not ratios:
            continue
        text = (
            f"- {label(method)}: final training loss / {ref}'s over the {len(ratios)} rates "
            f"stable for both: {fmt(min(ratios))} to {fmt(max(ratios))}"
        )
        if method in accuracy and ref in accuracy:
            gaps = [
                accuracy[method][lr] - accuracy[ref][lr]
                for lr in accuracy[method]
                if lr in accuracy[ref]
            ]
            if gaps:
                text += f"; test accuracy minus {ref}'s: {min(gaps):+.3f} to {max(gaps):+.3f}"
        lines.append(text)
    if not lines:
        return ""
    return "**Final loss at the same learning rates** (s = 0, medians over seeds):\n\n" + "\n".join(
        lines
    )


def render_task(entry: dict[str, Any]) -> str:
    """The expressivity paragraph of a task: the claim holds where every plain network that
    finished training changed by at most :data:`FUNCTION_CHANGE_TOL`, and is not measured where
    one has no finite change (a network the check cannot see could hide a change). A summary
    without ``balance_unmeasured`` did not count them."""
    change, unmeasured = entry["balance_function_change"], entry.get("balance_unmeasured", 0)
    held = VERDICT[None if change is None or unmeasured else change <= FUNCTION_CHANGE_TOL]
    if not unmeasured:
        return (
            "**Expressivity**: `balance_` applied to every trained plain network changed its "
            f"outputs by at most {fmt(change)} (relative, float64): claim (3), the representable "
            f"functions are identical, **{held}**."
        )
    who = (
        "network that finished training has"
        if unmeasured == 1
        else "networks that finished training have"
    )
    measured = f"; the networks measured changed by at most {fmt(change)} (relative, float64)"
    return (
        f"**Expressivity**: {unmeasured} plain {who} no finite output change when balanced by "
        f"`balance_`{measured if change is not None else ''}: claim (3), the representable "
        f"functions are identical, **{held}**."
    )
