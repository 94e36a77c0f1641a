"""Audit: the numbers a reader sees (summary.json, report.md, the figures, the README block) are
the numbers the definitions of docs/experiments.md give, recomputed here from the store alone with
plain sqlite and numpy (none of the project's computing functions)."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import gaugefix.report as report
from gaugefix.experiments.engine import RunConfig, RunResult
from gaugefix.experiments.store import Store
from gaugefix.report import readme

REFERENCES = ("plain", "balanced-init")
REPLICA = {"plain-replica": "plain"}  # a replica is compared with what it replicates only
AGAINST_EXACT = ("exact-first", "balance-after-step-1")
SHAMS = ("weight-decay", "plain-replica")
TUNING = 3  # seeds 0-2 choose a strength
RESAMPLES, BOOT_SEED, TAIL = 10_000, 0, 0.025
DEFINITIONS = [(f, m) for f in (2.0, 10.0, 1000.0) for m in (0.5, 0.9)]
DEFAULT = (1000.0, 0.9)
TOL = 1e-12  # exp of a mean of logs, summed in another order


# -- the independent recomputation ------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY id")]
    db.close()
    return rows


def _regime(r: dict) -> str:
    return f"{r['optimizer']}/{r['batch_size'] or 'full'}/{r['steps']}"


def _stable(r: dict, definition: tuple[float, float]) -> bool:
    """Stable under (factor, margin): not diverged (stored, or peak ratio above the factor) and
    final loss at most margin times min(initial, constant)."""
    factor, margin = definition
    peak = math.nan if r["peak_loss_ratio"] is None else r["peak_loss_ratio"]
    if r["status"] == "diverged" or peak > factor or r["final_loss"] is None:
        return False
    return r["final_loss"] <= margin * min(r["initial_loss"], r["constant_loss"])


def _band(stable_at: dict[float, bool]) -> float:
    """Top of the lowest stable band: skip unstable rates below it, stop at the first after."""
    rates = sorted(stable_at)
    ok = [lr for lr in rates if stable_at[lr]]
    if not ok:
        return 0.0
    start = rates.index(ok[0])
    top = ok[0]
    for lr in rates[start:]:
        if not stable_at[lr]:
            break
        top = lr
    return top


def _msl(runs: list[dict], definition=DEFAULT) -> float:
    at: dict[float, bool] = {}
    for r in runs:
        if r["bisection"] == 0:
            at[r["lr"]] = at.get(r["lr"], True) and _stable(r, definition)
    return _band(at)


def _edge(runs: list[dict], definition=DEFAULT) -> tuple[float, float | None]:
    """One seed's (lo, hi): band top over grid and bisection runs, the lowest rate above."""
    at: dict[float, bool] = {}
    for r in runs:
        at[r["lr"]] = at.get(r["lr"], True) and _stable(r, definition)
    lo = _band(at)
    above = [lr for lr in at if lr > lo]
    return lo, (min(above) if lo and above else None)


def _edge_value(runs, definition=DEFAULT) -> float:
    lo, hi = _edge(runs, definition)
    return lo if hi is None else math.sqrt(lo * hi)


def _by(runs, *keys) -> dict:
    out = defaultdict(list)
    for r in runs:
        out[tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]].append(r)
    return dict(out)


def _interval(ratios: list[float]) -> tuple[float, float]:
    """Percentile bootstrap: seeds resampled with replacement, numpy seed 0; the ends are the
    order statistics of the resampled mean log-ratios (inverted CDF, not interpolated)."""
    with np.errstate(divide="ignore"):
        logs = np.log(np.array(ratios, dtype=np.float64))
    rng = np.random.default_rng(BOOT_SEED)
    idx = rng.integers(0, len(logs), (RESAMPLES, len(logs)))
    means = np.sort(logs[idx].mean(axis=1))
    lo = means[math.ceil(TAIL * RESAMPLES) - 1]
    hi = means[math.ceil((1 - TAIL) * RESAMPLES) - 1]
    return float(np.exp(lo)), float(np.exp(hi))


def _stats(ratios: dict[int, float | None], bounds: dict[int, bool]) -> dict:
    known = {k: v for k, v in ratios.items() if v is not None}
    values = sorted(known.values())
    interval = _interval(list(known.values())) if known else None
    any_bound = any(bounds.get(k, False) for k in known)
    held = None
    if interval and len(known) == len(ratios):
        held = True if interval[0] > 1 else (None if any_bound else False)
    n = len(values)
    med = (
        None if not n else (values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2)
    )
    return {
        "min": values[0] if n else None,
        "median": med,
        "max": values[-1] if n else None,
        "seeds": len(ratios),
        "unknown_seeds": len(ratios) - n,
        "lower_bound": any_bound,
        "interval": list(interval) if interval else None,
        "held": held,
    }


def _compared(method: str, ref: str) -> bool:
    if ref == "exact":
        return method in AGAINST_EXACT
    return method != ref and REPLICA.get(method, ref) == ref


def _best(runs: list[dict]) -> dict[str, float]:
    """Per method: the strength with the largest sum over s of seeds 0-2's all-seed msl."""
    score: dict[tuple, float] = defaultdict(float)
    for (m, st, _), cell in _by(
        [r for r in runs if r["seed"] < TUNING], "method", "strength", "s"
    ).items():
        score[(m, st)] += _msl(cell)
    best: dict[str, float] = {}
    for (m, st), v in sorted(score.items()):
        if m not in best or v > score[(m, best[m])]:
            best[m] = st
    return best


def _regime_expected(runs: list[dict]) -> dict:
    """Every stability and drift number of one regime, from its stored runs."""
    best = _best(runs)
    strengths = _by(runs, "method")
    tuned = {m for m, rs in strengths.items() if len({r["strength"] for r in rs}) > 1}
    chosen = [r for r in runs if r["strength"] == best[r["method"]]]
    cells = _by(chosen, "method", "s")
    out = {"best_strength": best, "tuned": tuned}
    out["max_stable_lr"] = {m: {} for m, _ in cells}
    out["by_seed"] = {m: {} for m, _ in cells}
    tops = {}
    edges = {d: {m: {} for m, _ in cells} for d in DEFINITIONS}
    brackets = []
    for (m, s), cell in cells.items():
        key = str(float(s))
        out["max_stable_lr"][m][key] = _msl(cell)
        for d in DEFINITIONS:
            out.setdefault(d, {}).setdefault(m, {})[key] = _msl(cell, d)
        seeds = _by(cell, "seed")
        out["by_seed"][m][key] = {str(k): _msl(v) for k, v in seeds.items()}
        tops[(m, key)] = max(r["lr"] for r in cell if r["bisection"] == 0)
        for d in DEFINITIONS:
            edges[d][m][key] = {k: _edge_value(v, d) for k, v in seeds.items()}
        brackets += [hi / lo for v in seeds.values() for lo, hi in [_edge(v)] if hi is not None]
    out["edge_bracket"] = max(brackets) if brackets else None
    out["stable_edge_by_seed"] = {
        m: {s: {str(k): v for k, v in e.items()} for s, e in by_s.items()}
        for m, by_s in edges[DEFAULT].items()
    }
    out["ratios"] = {d: _expansion(edges[d], tops, tuned) for d in DEFINITIONS}
    out["late"] = _late([r for r in chosen if r["bisection"] == 0])
    out.update(_drift([r for r in chosen if r["bisection"] == 0]))
    return out


def _expansion(edges: dict, tops: dict, tuned: set) -> dict:
    out = {}
    for ref in (*REFERENCES, "exact"):
        if ref not in edges:
            continue
        out[ref] = {}
        for m, by_s in edges.items():
            if not _compared(m, ref):
                continue
            side = m if m in tuned else ref
            keep = (lambda k: k >= TUNING) if side in tuned else (lambda k: True)
            out[ref][m] = {}
            for s, seeds in by_s.items():
                if s not in edges[ref]:
                    continue
                mine = {k: v for k, v in seeds.items() if keep(k)}
                base = {k: v for k, v in edges[ref][s].items() if keep(k)}
                ratios, bounds = {}, {}
                for k in sorted(mine.keys() | base.keys()):
                    b = base.get(k, 0.0)
                    known = k in mine and 0.0 < b < tops[(ref, s)]
                    ratios[k] = mine[k] / b if known else None
                    bounds[k] = known and mine[k] >= tops[(m, s)]
                out[ref][m][s] = _stats(ratios, bounds)
    return out


def _late(grid: list[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in grid:
        alive = r["diverged_at"] is None or r["diverged_at"] > r["steps"] // 10
        c = out.setdefault(r["method"], [0, 0])
        c[0] += alive and r["diverged_at"] is not None
        c[1] += alive
    return out


def _drift(grid: list[dict]) -> dict:
    at0 = [r for r in grid if r["s"] == 0.0]
    present = {r["method"] for r in at0}
    ref = next((m for m in REFERENCES if m in present), None)
    if ref is None:
        return {}
    lr = _msl([r for r in at0 if r["method"] == ref])
    if not lr:
        return {}
    final = defaultdict(dict)
    for r in at0:
        if r["lr"] == lr:
            final[r["method"]][r["seed"]] = r["log_ratio_rms"]
    sup = {}
    for m in sorted(set(final) - {ref}):
        ratios = {}
        for k, base in final[ref].items():
            v = final[m].get(k)
            ratios[k] = base / v if base is not None and v else None
        sup[m] = _stats(ratios, {})
    return {"drift_reference": ref, "drift_lr": lr, "drift_suppression": sup}


def _horizons(trs: list[dict]) -> dict:
    """Per mini-batch optimizer/batch with several step counts (s = 0): long over short edge."""
    out = {}
    mini = [r for r in trs if r["batch_size"] and r["s"] == 0.0]
    for (opt, batch), rs in _by(mini, "optimizer", "batch_size").items():
        steps = sorted({r["steps"] for r in rs})
        if len(steps) < 2:
            continue
        ends = [[r for r in rs if r["steps"] == n] for n in (steps[0], steps[-1])]
        tuned = set()
        sides = []
        for end in ends:
            tuned |= {
                m for m, x in _by(end, "method").items() if len({r["strength"] for r in x}) > 1
            }
            best = _best(end)
            chosen = _by([r for r in end if r["strength"] == best[r["method"]]], "method")
            sides.append(
                {
                    m: (
                        {k: _edge_value(v) for k, v in _by(c, "seed").items()},
                        max(r["lr"] for r in c if r["bisection"] == 0),
                    )
                    for m, c in chosen.items()
                }
            )
        short, long = sides
        methods = {}
        for m in sorted(short.keys() & long.keys()):
            (base, stop), (edge, ltop) = short[m], long[m]
            keep = (lambda k: k >= TUNING) if m in tuned else (lambda k: True)
            base = {k: v for k, v in base.items() if keep(k)}
            edge = {k: v for k, v in edge.items() if keep(k)}
            ratios, bounds = {}, {}
            for k in sorted(edge.keys() | base.keys()):
                b = base.get(k, 0.0)
                known = k in edge and 0.0 < b < stop
                ratios[k] = edge[k] / b if known else None
                bounds[k] = known and edge[k] >= ltop
            st = _stats(ratios, bounds)
            narrowed = None
            if st["interval"] and not st["unknown_seeds"]:
                narrowed = (
                    False if st["interval"][1] >= 1 else (None if st["lower_bound"] else True)
                )
            methods[m] = {**st, "narrowed": narrowed}
        out[f"{opt}/{batch}"] = {"short": steps[0], "long": steps[-1], "methods": methods}
    return out


def expected(path: Path) -> dict:
    """Per task: each regime's :func:`_regime_expected` and the horizons."""
    rows = _rows(path)
    tasks = {}
    for task, trs in _by(rows, "task").items():
        assert len({r["task_hash"][:8] for r in trs}) == 1  # one version per name here
        regimes = defaultdict(list)
        for r in trs:
            regimes[_regime(r)].append(r)
        tasks[task] = {
            "regimes": {k: _regime_expected(rs) for k, rs in regimes.items()},
            "horizons": _horizons(trs),
        }
    return tasks


def _count(tasks: dict, definition=DEFAULT, headline_only=False) -> dict:
    """Verdicts made and held (expansion, drift, horizons), and each sham's expansion ones."""
    made = held = 0
    shams: dict[str, list[int]] = {}
    for t in tasks.values():
        for key, g in t["regimes"].items():
            if headline_only and "/full/" not in key:
                continue
            for by_m in g["ratios"][definition].values():
                for m, by_s in by_m.items():
                    for st in by_s.values():
                        if st["held"] is None:
                            continue
                        made, held = made + 1, held + st["held"]
                        if m in SHAMS:
                            c = shams.setdefault(m, [0, 0])
                            c[0], c[1] = c[0] + 1, c[1] + st["held"]
            if headline_only:
                continue
            for st in g.get("drift_suppression", {}).values():
                if st["held"] is not None:
                    made, held = made + 1, held + st["held"]
        if not headline_only:
            for h in t["horizons"].values():
                for st in h["methods"].values():
                    if st["narrowed"] is not None:
                        made, held = made + 1, held + st["narrowed"]
    return {"verdicts": made, "held": held, "shams": shams}


# -- comparisons -----------------------------------------------------------------------------
def _same(a, b, path="") -> list[str]:
    """Where ``a`` (recomputed) and ``b`` (the summary's) differ: exactly, but floats to TOL."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [p for k in a for p in _same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: {a} != {b}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [p for i, (x, y) in pairs for p in _same(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float | int) and not isinstance(b, bool):
        if math.isfinite(a) and math.isclose(a, b, rel_tol=TOL, abs_tol=0.0) or a == b:
            return []
        return [f"{path}: {a!r} != {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


def _summary_diffs(path: Path, summary: dict) -> list[str]:
    """Every stability, drift, horizon and count of ``summary`` against the recomputation."""
    exp = expected(path)
    diffs = []
    for task, t in exp.items():
        st = summary["tasks"][task]
        for key, g in t["regimes"].items():
            sg, at = st["regimes"][key], f"{task}/{key}"
            pairs = [
                ("best_strength", g["best_strength"], sg["best_strength"]),
                ("max_stable_lr", g["max_stable_lr"], sg["max_stable_lr"]),
                ("max_stable_lr_by_seed", g["by_seed"], sg["max_stable_lr_by_seed"]),
                ("stable_edge_by_seed", g["stable_edge_by_seed"], sg["stable_edge_by_seed"]),
                ("expansion_ratio", g["ratios"][DEFAULT], sg["expansion_ratio"]),
                ("late_divergences", g["late"], sg["late_divergences"]),
                ("drift_suppression", g.get("drift_suppression"), sg.get("drift_suppression")),
                ("drift_lr", g.get("drift_lr"), sg.get("drift_lr")),
                ("drift_reference", g.get("drift_reference"), sg.get("drift_reference")),
            ]
            if g["edge_bracket"] is not None or sg["edge_bracket"] is not None:
                pairs.append(("edge_bracket", g["edge_bracket"], sg["edge_bracket"]))
            for d in DEFINITIONS:
                k = f"{d[0]:g}x/{d[1]:g}"
                held = {
                    ref: {m: {s: x["held"] for s, x in by_s.items()} for m, by_s in by_m.items()}
                    for ref, by_m in g["ratios"][d].items()
                }
                pairs.append((f"verdicts_by_definition/{k}", held, sg["verdicts_by_definition"][k]))
                pairs.append((f"msl_by_definition/{k}", g[d], sg["max_stable_lr_by_definition"][k]))
            for name, a, b in pairs:
                diffs += _same(a, b, f"{at}/{name}")
        diffs += _same(t["horizons"], st["horizons"], f"{task}/horizons")
    count = _count(exp)
    diffs += _count_diffs(count, summary["verdicts"], "verdicts")
    for d in DEFINITIONS:
        k = f"{d[0]:g}x/{d[1]:g}"
        diffs += _count_diffs(_count(exp, d, True), summary["sensitivity"][k], f"sensitivity/{k}")
    return diffs


def _count_diffs(count: dict, stated: dict, at: str) -> list[str]:
    shams = {
        m: {"verdicts": v, "held": h, "false_positive_rate": h / v}
        for m, (v, h) in count["shams"].items()
    }
    want = {"verdicts": count["verdicts"], "held": count["held"], "shams": shams}
    return _same(want, stated, at)


# -- a synthetic store of several seeds: the bootstrap, tuning and the edge cases -------------
GRID = [2.0 ** (k / 2) for k in range(-8, 3)]  # 1/16 .. 2, ratio sqrt(2)
SEEDS = 6
TASK = "synthetic"
HASH = "0123456789abcdef"


def _result(method, strength, s, seed, lr, edge, bisection=0) -> RunResult:
    """A run stable below ``edge`` (the lowest rate too small to learn), diverged above it;
    near the edge its peak ratio and final loss vary, so the sensitivity definitions differ."""
    config = RunConfig(TASK, method, "gd", lr, strength, s, seed, 0, 20, task_hash=HASH,
                       bisection=bisection)  # fmt: skip
    near = lr > edge / 1.5
    if lr > edge:
        status, final, peak, at = "diverged", None, 2e3, 1 + (seed + int(lr * 8)) % 19
    elif lr == GRID[0] and seed % 3 == 1:
        status, final, peak, at = "unstable", 0.95, 1.0, None
    else:
        final = 0.7 if near and seed % 2 else 0.3
        peak = (5.0 if seed % 2 else 50.0) if near else 1.0
        status, at = "stable", None
    drift = None if final is None else 0.05 * (1 + seed) * (1 + len(method) % 5)
    return RunResult(config, status, 1.0, 1.2, final, None, None, None, drift, None, at, peak)


def _synthetic_runs() -> list[RunResult]:
    """Methods with seed-dependent edges; exact at two strengths (tuned on seeds 0-2);
    exact's seed 5 missing at s = 1; plain diverged at every rate for seed 4 at s = 2;
    balanced-exact stable to the grid's top at s = 0; the sham controls."""
    rng = np.random.default_rng(7)
    methods = {"plain": [0.0], "balanced-init": [0.0], "exact": [0.1, 1.0], "plain-replica": [0.0],
               "weight-decay": [0.001], "balanced-exact": [1.0], "exact-first": [1.0]}  # fmt: skip
    runs = []
    for (method, strengths), s, seed in (
        (m, s, k) for m in methods.items() for s in (0.0, 1.0, 2.0) for k in range(SEEDS)
    ):
        for strength in strengths:
            edge = float(np.exp(rng.uniform(np.log(0.1), np.log(1.5))))
            if method == "balanced-exact" and s == 0.0:
                edge = 10.0
            if method == "plain" and s == 2.0 and seed == 4:
                edge = 0.01
            if method == "exact" and s == 1.0 and seed == 5:
                continue
            grid = [_result(method, strength, s, seed, lr, edge) for lr in GRID]
            runs += grid
            lo = max([0.0] + [r.config.lr for r in grid if r.status == "stable"])
            above = [lr for lr in GRID if lr > lo]
            if lo and above:  # one round of bisection
                mid = math.sqrt(lo * min(above))
                runs.append(_result(method, strength, s, seed, mid, edge, bisection=1))
    return runs


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    store = Store(out / report.STORE_NAME)
    for r in _synthetic_runs():
        store.add_run(r, 0.0)
    report.render(out, quick=False)
    return out


def test_the_bootstrap_lower_end_is_the_2_5th_percentile_of_the_resampled_means():
    """Six seeds whose resampled means differ between their 250th and 251st smallest of 10000:
    the lower end is the 250th (inverted CDF at 0.025), not one order statistic above it."""
    from gaugefix.experiments.stability import bootstrap_interval

    ratios = [2.0, 2.0**-0.75, 2.0**-2.5, 2.0**2.25, 2.0**2.5, 1.0]
    assert bootstrap_interval(ratios) == pytest.approx(_interval(ratios), rel=TOL)
    assert _interval(ratios)[0] < 0.49  # the 251st smallest is exp(-log 2) = 0.5


def test_a_store_of_several_seeds_is_summarized_as_the_definitions_say(synthetic):
    summary = json.loads((synthetic / "summary.json").read_text())
    assert _summary_diffs(synthetic / report.STORE_NAME, summary) == []
    g = summary["tasks"][TASK]["regimes"]["gd/full/20"]
    ratios = g["expansion_ratio"]
    # exact was tuned on seeds 0-2 and is judged on 3-5; its seed 5 is missing at s = 1
    assert ratios["plain"]["exact"]["0.0"]["seeds"] == SEEDS - TUNING
    missing = ratios["plain"]["exact"]["1.0"]
    assert missing["unknown_seeds"] == 1 and missing["held"] is None
    # plain had no stable rate at s = 2 for seed 4: every ratio over it is unknown there
    assert all(by_s["2.0"]["held"] is None for by_s in ratios["plain"].values())
    # balanced-exact stable to the grid's top at s = 0: lower bounds
    top = ratios["plain"]["balanced-exact"]["0.0"]
    assert top["lower_bound"] is True and top["held"] in (True, None)
    assert g["max_stable_lr_at_grid_top"] == {"balanced-exact": ["0.0"]}
    # the sensitivity definitions judge differently on this store
    held = {k: json.dumps(v, sort_keys=True) for k, v in g["verdicts_by_definition"].items()}
    assert len(set(held.values())) > 1


# -- the quick reproduction --------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(quick_run, tmp_path_factory) -> Path:
    """A copy of the session's ``reproduce --quick --jobs 2`` (exit code 0), this module's own."""
    out = tmp_path_factory.mktemp("quick") / "results"
    shutil.copytree(quick_run[0], out)
    return out


def _fmt(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _ratio(st: dict) -> str:
    if st["median"] is None:
        return "n/a"
    bound = "≥ " if st["lower_bound"] else ""
    if st["min"] == st["max"]:
        return bound + _fmt(st["median"])
    return f"{bound}{_fmt(st['median'])} [{_fmt(st['min'])}, {_fmt(st['max'])}]"


MARKS = {True: "✓", False: "✗", None: "?"}


def _report_lines(tasks: dict) -> list[str]:
    """The headline rows and the verdict sentence, written from the recomputation."""
    lines = []
    for task, t in tasks.items():
        for key, g in t["regimes"].items():
            opt, batch, steps = key.split("/")
            label = f"full-batch {opt}, {steps} steps" if batch == "full" else (
                f"{opt}, batch {batch}, {steps} steps")  # fmt: skip
            r = g["ratios"][DEFAULT]
            for m in g["max_stable_lr"]:
                cells = [
                    "; ".join(
                        f"{float(s):g}: {_ratio(st)} {MARKS[st['held']]}"
                        for s, st in sorted(r[ref][m].items(), key=lambda kv: float(kv[0]))
                    )
                    if m in r.get(ref, {}) else "-"
                    for ref in REFERENCES
                ]  # fmt: skip
                if cells == ["-", "-"]:
                    continue
                d = g.get("drift_suppression", {}).get(m)
                dcell = f"{_ratio(d)} {MARKS[d['held']]}" if d else "-"
                strength = g["best_strength"][m]
                name = f"{m} ({strength:g})" if strength else m
                lines.append(f"| {task} | {label} | {name} | {cells[0]} | {cells[1]} | {dcell} |")
    return lines


def test_the_quick_summary_and_report_are_the_definitions_recomputed(quick):
    summary = json.loads((quick / "summary.json").read_text())
    assert _summary_diffs(quick / report.STORE_NAME, summary) == []
    exp = expected(quick / report.STORE_NAME)
    text = (quick / "report.md").read_text()
    missing = [line for line in _report_lines(exp) if line not in text.splitlines()]
    assert missing == []
    c = _count(exp)
    assert f"The report makes {c['verdicts']} verdicts, {c['held']} of them held." in text
    for m, (v, h) in c["shams"].items():
        assert f"{m} held in {h} of its {v} expansion verdicts ({h / v:.0%})" in text
    sens = [_count(exp, d, True) for d in DEFINITIONS]
    row = "| all | | held / made | " + " | ".join(f"{x['held']} / {x['verdicts']}" for x in sens)
    assert row + " |" in text
    # sharpness at the edge trains at seed 0's stable end of its bracket (the GD regime)
    rows = _rows(quick / report.STORE_NAME)
    for method, by_s in summary["sharpness_track"]["teacher-student"].items():
        for s, e in by_s.items():
            cell = [r for r in rows if r["task"] == "teacher-student" and r["method"] == method
                    and r["optimizer"] == "gd" and r["s"] == float(s) and r["seed"] == 0
                    and r["strength"] == e["strength"]]  # fmt: skip
            assert e["measured_edge"] == _edge(cell)[0]


def _recorded(monkeypatch, *names: str) -> list:
    """Every call of the named Axes methods: (method name, axes, args, kwargs)."""
    calls = []
    for name in names:
        original = getattr(Axes, name)

        def wrapper(ax, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, ax, args, kwargs))
            return _original(ax, *args, **kwargs)

        monkeypatch.setattr(Axes, name, wrapper)
    return calls


def _title(ax) -> str:
    return ax.figure.get_suptitle() if ax.figure._suptitle else ""


def test_the_quick_figures_plot_the_summarys_data(quick, monkeypatch, tmp_path):
    # what each figure is given to plot, not its pixels: the figures are built but not drawn
    # (drawing is most of a render; the reproduction that made ``quick`` drew them all), in a
    # copy, so that ``quick`` keeps its files
    shutil.copytree(quick, tmp_path / "results")
    quick = tmp_path / "results"
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: None)
    calls = _recorded(monkeypatch, "pcolormesh", "scatter", "plot")
    summary = report.render(quick)
    rows = _rows(quick / report.STORE_NAME)
    exp = expected(quick / report.STORE_NAME)
    maps = edges = drifts = 0
    for name, ax, args, kwargs in calls:
        task = _title(ax).split(":")[0]
        if (
            name == "pcolormesh" and ax.get_title()
        ):  # the stability map (not its color bar): fraction of seeds stable per lr and s
            head = f"{task}: "
            key = next(
                k for k in exp[task]["regimes"] if _title(ax).startswith(f"{head}{_label(k)} (")
            )
            method = ax.get_title().split(" (")[0]
            grid = [r for r in rows if r["task"] == task and _regime(r) == key
                    and r["bisection"] == 0]  # fmt: skip
            best = exp[task]["regimes"][key]["best_strength"]
            chosen = [r for r in grid if r["strength"] == best[r["method"]]]
            lrs, ss = sorted({r["lr"] for r in chosen}), sorted({r["s"] for r in chosen})
            want = np.full((len(lrs), len(ss)), np.nan)
            for (lr, s), c in _by([r for r in chosen if r["method"] == method], "lr", "s").items():
                want[lrs.index(lr), ss.index(s)] = np.mean([r["status"] == "stable" for r in c])
            np.testing.assert_array_equal(
                np.asarray(args[2]), want, err_msg=f"{_title(ax)} {key} {method}"
            )
            full = {lr: bool(np.all(want[i] == 1)) for i, lr in enumerate(lrs)}
            for j, s in enumerate(ss):
                col = {lr: want[i, j] == 1 for i, lr in enumerate(lrs) if not np.isnan(want[i, j])}
                msl = summary["tasks"][task]["regimes"][key]["max_stable_lr"][method]
                assert _band(col) == msl[str(s)]
            maps += bool(full)
        elif name == "scatter" and "continuous gauge fixing" in _title(ax):
            edges += 1
            key = next(k for k in exp[task]["regimes"] if _label(k) == ax.get_title())
            g = summary["tasks"][task]["regimes"][key]
            y = float(np.ravel(args[1])[0])
            values = {v for by_s in g["stable_edge_by_seed"].values() for c in by_s.values()
                      for v in c.values()}  # fmt: skip
            positive = [v for v in values if v > 0]
            assert y in values or (kwargs["marker"] == "v" and y == min(positive) / 2)
        elif name == "plot" and "scale drift" in _title(ax) and ax.get_ylabel() == "":
            drifts += 1
    assert maps and edges
    _check_drift_lines(quick, summary, rows, calls)


def _label(key: str) -> str:
    opt, batch, steps = key.split("/")
    return f"full-batch {opt}, {steps} steps" if batch == "full" else (
        f"{opt}, batch {batch}, {steps} steps")  # fmt: skip


def _check_drift_lines(quick: Path, summary: dict, rows: list[dict], calls: list) -> None:
    """Each drift line is the stored curve of its method's run at the regime's drift lr, s = 0,
    first seed, best strength."""
    db = sqlite3.connect(quick / report.STORE_NAME)
    checked = 0
    for name, ax, args, kwargs in calls:
        if name != "plot" or "scale drift" not in _title(ax):
            continue
        task = _title(ax).split(":")[0]
        head = ax.get_title().split("\n")[0] if ax.get_title() else None
        panel = ax if head else None
        if panel is None:  # a bottom panel: its title is on the panel above
            continue
        key = next(k for k in summary["tasks"][task]["regimes"] if _label(k) == head)
        g = summary["tasks"][task]["regimes"][key]
        first = min(x["seed"] for x in rows if x["task"] == task and _regime(x) == key)
        method = kwargs["label"]
        (run,) = [
            r
            for r in rows
            if r["task"] == task and _regime(r) == key and r["s"] == 0.0 and r["seed"] == first
            and r["lr"] == g["drift_lr"] and r["method"] == method and r["bisection"] == 0
            and r["strength"] == g["best_strength"][method]
        ]  # fmt: skip
        assert run["status"] != "diverged"
        curve = db.execute("SELECT step, log_ratio_rms FROM curves WHERE run_id = ? ORDER BY step",
                           (run["id"],)).fetchall()  # fmt: skip
        assert list(args[0]) == [c[0] for c in curve]
        np.testing.assert_array_equal(np.array(args[1], dtype=float),
                                      np.array([c[1] for c in curve], dtype=float))  # fmt: skip
        checked += 1
    db.close()
    assert checked


def _method_rows(summary: dict) -> dict[str, list[str]]:
    """Per method, the README's cells counted from the summary: held / made against plain and
    balanced-init, interval below 1 / made against balanced-init, drift, late divergences."""
    c: dict = defaultdict(lambda: [0, 0, 0])
    for t in summary["tasks"].values():
        for g in t["regimes"].values():
            for ref, by_m in g["expansion_ratio"].items():
                for m, by_s in by_m.items():
                    for st in by_s.values():
                        x = c[(m, ref)]
                        if st["held"] is not None:
                            x[0], x[1] = x[0] + (st["held"] is True), x[1] + 1
                            x[2] += st["interval"][1] < 1
            for m, st in g.get("drift_suppression", {}).items():
                x = c[(m, "drift")]
                if st["held"] is not None:
                    x[0], x[1] = x[0] + (st["held"] is True), x[1] + 1
            for m, (late, alive) in g["late_divergences"].items():
                x = c[(m, "late")]
                x[0], x[1] = x[0] + late, x[1] + alive
    out = {}
    for m in {m for m, _ in c}:
        if (m, "plain") not in c and (m, "balanced-init") not in c:
            continue
        cell = [f"{c[(m, k)][0]} / {c[(m, k)][1]}" if (m, k) in c else "-" for k in REFERENCES]
        below = f"{c[(m, 'balanced-init')][2]} / {c[(m, 'balanced-init')][1]}" if (
            m, "balanced-init") in c else "-"  # fmt: skip
        more = [
            f"{c[(m, k)][0]} / {c[(m, k)][1]}" if (m, k) in c else "-" for k in ("drift", "late")
        ]
        out[m] = [*cell, below, *more]
    return out


@pytest.mark.parametrize("which", ["quick", "published"])
def test_the_readme_block_states_the_summarys_numbers(which, request):
    if which == "quick":
        summary = json.loads((request.getfixturevalue("quick") / "summary.json").read_text())
    else:
        summary = json.loads(Path("docs/figures/full-summary.json").read_text())
    block = readme.results_block(summary)
    rows = {line.split(" | ")[0][2:]: line[2:-2].split(" | ")[1:6] for line in block.splitlines()
            if line.startswith("| ") and line.count(" | ") == 5}  # fmt: skip
    for m, cells in _method_rows(summary).items():
        assert rows[m] == cells, m
    v = summary["verdicts"]
    assert f"The report makes {v['verdicts']} verdicts, {v['held']} of them held." in block
    for key, c in summary["sensitivity"].items():
        assert f"| {key} | {c['held']} / {c['verdicts']} |" in block
    if which == "published":  # the README shows the published summary's block
        assert block in Path("README.md").read_text()


def test_the_published_intervals_are_the_bootstraps_of_their_own_edges():
    summary = json.loads(Path("docs/figures/full-summary.json").read_text())
    differ = 0
    for t in summary["tasks"].values():
        for g in t["regimes"].values():
            e = g["stable_edge_by_seed"]
            for ref, by_m in g["expansion_ratio"].items():
                for m, by_s in by_m.items():
                    for s, st in by_s.items():
                        if st["unknown_seeds"] or not st["interval"]:
                            continue
                        seeds = sorted(e[m][s].keys() & e[ref][s].keys(), key=int)
                        if st["seeds"] < len(seeds):  # a tuned side: judged on seeds 3 and up
                            seeds = [k for k in seeds if int(k) >= TUNING]
                        ratios = [e[m][s][k] / e[ref][s][k] for k in seeds]
                        if len(ratios) == st["seeds"]:
                            differ += _same(list(_interval(ratios)), st["interval"]) != []
    assert differ == 0
