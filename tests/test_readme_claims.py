"""The README's reading of the published full run ("What the run says") states numbers that are
the published summary's: each count, ratio and rate in its prose is computed here again from
docs/figures/full-summary.json, and the generated block states the rules its marks stand for."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gaugefix.experiments import dose
from gaugefix.experiments.figures import fmt
from gaugefix.report.readme import CONTINUOUS, results_block

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = json.loads((ROOT / "docs" / "figures" / "full-summary.json").read_text())
PROSE = re.sub(r"\s+", " ", (ROOT / "README.md").read_text().split("What the run says:")[1])
FULL_GD = "gd/full/50"


def _verdicts(ref: str, methods, task: str | None = None, regime: str | None = None) -> list:
    """The ratio stats of every verdict made against ``ref`` of ``methods``."""
    return [
        st
        for name, t in SUMMARY["tasks"].items()
        if task in (None, name)
        for key, g in t["regimes"].items()
        if regime in (None, key)
        for m, by_s in g["expansion_ratio"].get(ref, {}).items()
        if m in methods
        for st in by_s.values()
        if st["held"] is not None
    ]


def _counts(stats: list) -> tuple[int, int, int]:
    """(held, made, narrower: the interval's upper end below 1)."""
    below = sum(st["interval"][1] is not None and st["interval"][1] < 1 for st in stats)
    return sum(st["held"] is True for st in stats), len(stats), below


def _said(phrase: str) -> None:
    assert phrase in PROSE, phrase


def test_against_plain_counts():
    held, made, below = _counts(_verdicts("plain", CONTINUOUS))
    _said(f"held wider than plain in {held} of their {made} verdicts")
    _said(f"were narrower (the whole interval below 1) in {below},")
    _, made, below = _counts(_verdicts("plain", ("plain-replica",)))
    _said(f"the plain replica was narrower than plain in {below} of its {made}")
    held, made, below = _counts(_verdicts("plain", CONTINUOUS, "digits", FULL_GD))
    assert held == 0
    _said(f"no continuous method was wider than plain there, and {below} of their {made}")


def test_against_a_balanced_start_counts():
    held, made, below = _counts(_verdicts("balanced-init", ("exact", "balanced-exact", "balance")))
    assert held == 0
    _said(f"held in none of their {made} verdicts against `balanced-init`")
    _said(f"were narrower in {below})")
    held, made, below = _counts(_verdicts("balanced-init", ("decoupled-penalty",)))
    assert held == 0
    _said(f"(narrower in {below} of its {made} verdicts)")


def test_exact_first_against_a_balanced_start():
    def medians(task: str) -> dict:
        ratios = SUMMARY["tasks"][task]["regimes"]["gd/full/150"]["expansion_ratio"]
        return {s: st["median"] for s, st in ratios["balanced-init"]["exact-first"].items()}

    assert {f"{m:.2f}" for m in medians("teacher-student").values()} == {"0.92"}
    _said("median ratios 0.92 on teacher-student at every `s`")
    deep = medians("deep-teacher-student")
    assert min(deep, key=deep.get) == "2.0"
    _said(f"down to {deep['2.0']:.2f} on the deep student at `s = 2`")


def _seed_ratios(regime: str, method: str, task: str = "char-gpt") -> dict:
    return SUMMARY["tasks"][task]["regimes"][regime]["expansion_ratio"]["plain"][method]["0.0"]


def test_the_realistic_models_against_plain():
    adamw, momentum = "adamw/16/100", "momentum/16/100"
    for method in ("exact", "exact-every-10"):  # one seed equal to plain's edge: not narrower
        st = _seed_ratios(adamw, method)
        assert st["max"] == 1.0 and st["min"] < 1 and st["held"] is False
    assert _seed_ratios(adamw, "balance")["interval"][1] < 1
    replica = _seed_ratios(adamw, "plain-replica")
    _said(f"ratios to plain ran from {replica['min']:.2f} to {fmt(replica['max'])})")
    for task in ("char-gpt", "residual-cnn"):
        key = next(k for k in SUMMARY["tasks"][task]["regimes"] if k.startswith("momentum"))
        assert _counts(_verdicts("plain", CONTINUOUS, task, key))[0] == 0
    assert _seed_ratios(momentum, "exact")["interval"][1] < 1
    assert _seed_ratios("momentum/64/100", "balance", "residual-cnn")["interval"][1] < 1
    _said("the exact step was narrower than plain on the GPT, hard balancing on the residual CNN")


def _by_method(field: str) -> dict[str, list[int]]:
    """Per method, [held, made] of the drift verdicts, or [late, alive] of late divergences."""
    out: dict[str, list[int]] = {}
    for g in (g for t in SUMMARY["tasks"].values() for g in t["regimes"].values()):
        for m, v in g.get(field, {}).items():
            c = out.setdefault(m, [0, 0])
            pair = (v["held"] is True, v["held"] is not None) if isinstance(v, dict) else v
            c[0], c[1] = c[0] + pair[0], c[1] + pair[1]
    return out


def test_drift_and_late_divergence_counts():
    drift = _by_method("drift_suppression")
    held = sum(drift[m][0] for m in CONTINUOUS if m in drift)
    made = sum(drift[m][1] for m in CONTINUOUS if m in drift)
    _said(f"less drift than their reference in {held} of their {made} verdicts")
    _said(f"so did weight decay in {drift['weight-decay'][0]} of its {drift['weight-decay'][1]}")
    sham = drift["plain-replica"]
    _said(f"the plain replica in {sham[0]} of its {sham[1]} ({round(100 * sham[0] / sham[1])}%")
    late = _by_method("late_divergences")
    _said(f"The penalty ({late['penalty'][0]} late divergences of {late['penalty'][1]} runs")
    for m in ("balanced-penalty", "decoupled-penalty", "plain", "balance"):
        _said(f"({late[m][0]} of {late[m][1]})")
    _said(f"the plain replica ({late['plain-replica'][0]} of {late['plain-replica'][1]})")


def test_relaxation_error():
    _said(f"to within a relative error of {fmt(SUMMARY['relaxation']['max_relative_error'])} at")


def test_the_block_states_what_its_marks_and_the_dose_rule_mean():
    """The mechanism table's ✗ is "did not hold", not "narrower"; the dose lines name their
    rule's constants and the points they leave out."""
    block = results_block(SUMMARY)
    assert "✗ did not hold, which is not narrower" in block
    rule = f"pooled rho at most {dose.SHARED_RHO:g} and at most {dose.SHARED_SLACK:g} above"
    for task, d in SUMMARY[dose.KEY].items():
        line = next(x for x in block.splitlines() if x.startswith(f"- dose-response on {task} "))
        assert f"; {d['excluded']} points left out; " in line and rule in line
