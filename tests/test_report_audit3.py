"""Third audit of what the summary and the report print: every number and verdict of report.md
and of the README block is the summary.json value it stands for (the tables parsed back and
compared), summary.json's values are recomputed by hand from small stores, and the README block
reads summary.json as written (its round trip) at the edges: several task versions, one seed,
a method in one regime, strengths chosen per regime, unknown seeds, lower bounds, non-finite
values."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

import gaugefix.report as report
from gaugefix.experiments.engine import RunResult
from gaugefix.experiments.store import Store
from gaugefix.report import readme
from runs import run_result

LRS = (0.1, 0.2, 0.4, 0.8, 1.6)
VERSIONS = ("aaaaaaaa11", "bbbbbbbb22")
MARKS = {True: "✓", False: "✗", None: "?"}
TOL = 1e-12


def _with(run: RunResult, **config) -> RunResult:
    return dataclasses.replace(run, config=dataclasses.replace(run.config, **config))


def _cell(method: str, top: float, seeds, **config) -> list[RunResult]:
    """A method's grid runs, stable up to ``top`` on every seed of ``seeds``."""
    return [_with(run_result(method, lr, top, seed=k), **config) for lr in LRS for k in seeds]


def _runs(s: float = 0.0) -> list[RunResult]:
    """Two versions of task t; full batch: plain, balanced-init and penalty at two strengths
    (best 0.1) on four seeds, balance stable to the grid's top; batch 8: one seed of plain,
    exact and penalty (best 1.0 there). In the second version plain's seed 3 has no stable
    rate (every ratio over it is unknown)."""
    runs = []
    for h in VERSIONS:
        full = {"task_hash": h, "s": s}
        runs += _cell("plain", 0.2, range(3), **full)
        runs += _cell("plain", 0.2 if h == VERSIONS[0] else 0.05, [3], **full)
        runs += _cell("balance", 1.6, range(4), **full)
        runs += _cell("balanced-init", 0.4, range(4), **full)
        runs += _cell("penalty", 0.8, range(4), strength=0.1, **full)
        runs += _cell("penalty", 0.4, range(4), strength=1.0, **full)
        mini = {**full, "batch_size": 8}
        runs += _cell("plain", 0.1, [0], **mini)
        runs += _cell("exact", 1.6, [0], strength=1.0, **mini)
        runs += _cell("penalty", 0.2, [0], strength=0.1, **mini)
        runs += _cell("penalty", 0.4, [0], strength=1.0, **mini)
    return runs


def _render(path: Path, runs: list[RunResult]) -> tuple[dict, str]:
    """The summary.json (as read back) and report.md of a store of ``runs``."""
    store = Store(path / report.STORE_NAME)
    for r in runs:
        store.add_run(r, 1.0)
    report.render(path, quick=True)
    return json.loads((path / "summary.json").read_text()), (path / "report.md").read_text()


# -- the report's text, written again from summary.json alone ------------------------------------
def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _ratio(st: dict) -> str:
    if st["median"] is None:
        return "n/a"
    bound = "≥ " if st["lower_bound"] else ""
    spread = "" if st["min"] == st["max"] else f" [{_num(st['min'])}, {_num(st['max'])}]"
    return f"{bound}{_num(st['median'])}{spread}"


def _s(key: str) -> float:
    return float(key)


def _table(text: str, head: str) -> list[list[str]]:
    """The cells of the rows of the markdown table whose header line starts with ``head``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def _by_s(cell: str) -> dict[float, str]:
    """``0: 2 [1, 3] ✓; 1: n/a ?`` as {s: "2 [1, 3] ✓", ...}, each s read as a number."""
    if cell == "-":
        return {}
    out = {}
    for part in cell.split("; "):
        s, _, rest = part.partition(": ")
        out[float(s)] = rest
    return out


def _headline_expected(summary: dict) -> dict[tuple[str, str, str], list]:
    """Per (task, regime key, method as labelled): by reference, {s: ratio and mark}; drift."""
    out = {}
    for task, t in summary["tasks"].items():
        for key, g in t["regimes"].items():
            strength = g["best_strength"]
            for m in g["max_stable_lr"]:
                cells = [
                    {_s(s): f"{_ratio(st)} {MARKS[st['held']]}" for s, st in by_s.items()}
                    for ref in report.REFERENCES
                    for by_s in [g["expansion_ratio"].get(ref, {}).get(m, {})]
                ]
                if cells == [{}, {}]:
                    continue
                d = g.get("drift_suppression", {}).get(m)
                drift = f"{_ratio(d)} {MARKS[d['held']]}" if d else "-"
                name = f"{m} ({strength[m]:g})" if strength.get(m) else m
                out[(task, key, name)] = [*cells, drift]
    return out


def _label(key: str) -> str:
    opt, batch, steps = key.split("/")
    if batch == "full":
        return f"full-batch {opt}, {steps} steps"
    return f"{opt}, batch {batch}, {steps} steps"


def _headline_printed(text: str, summary: dict) -> dict[tuple[str, str, str], list]:
    labels = {(t, _label(k)): k for t, v in summary["tasks"].items() for k in v["regimes"]}
    out = {}
    for task, regime, method, plain, balanced, drift in _table(text, "| task | regime | method"):
        key = (task, labels[(task, regime)], method)
        assert key not in out, key
        out[key] = [_by_s(plain), _by_s(balanced), drift]
    return out


def test_the_headline_prints_summary_json_for_versions_regimes_and_one_seed(tmp_path):
    summary, text = _render(tmp_path, _runs())
    assert sorted(summary["tasks"]) == ["t@aaaaaaaa", "t@bbbbbbbb"]
    assert _headline_printed(text, summary) == _headline_expected(summary)


def test_the_summary_values_are_recomputed_by_hand(tmp_path):
    """Each version alike; full batch: penalty best at 0.1 (edges 0.8 and 0.4 on seeds 0-2),
    judged on seed 3 alone; batch 8: penalty best at 1.0, judged on no seed (one seed ran)."""
    summary, _ = _render(tmp_path, _runs())
    edge = {top: math.sqrt(top * 2 * top) for top in (0.1, 0.2, 0.4, 0.8)}
    edge[0.05] = 0.0  # no stable rate
    for task, unknown in (("t@aaaaaaaa", 0), ("t@bbbbbbbb", 1)):
        t = summary["tasks"][task]
        assert t["task_hash"] == task.split("@")[1]
        full, mini = t["regimes"]["sgd/full/10"], t["regimes"]["sgd/8/10"]
        assert full["best_strength"]["penalty"] == 0.1 and mini["best_strength"]["penalty"] == 1.0
        st = full["expansion_ratio"]["plain"]["penalty"]["0.0"]
        assert (st["seeds"], st["unknown_seeds"]) == (1, unknown)
        assert st["held"] is (None if unknown else True)
        assert st["median"] == (None if unknown else pytest.approx(edge[0.8] / edge[0.2], rel=TOL))
        st = full["expansion_ratio"]["plain"]["balance"]["0.0"]
        assert (st["seeds"], st["unknown_seeds"], st["lower_bound"]) == (4, unknown, True)
        assert st["held"] is (None if unknown else True)
        assert abs(st["median"] - 1.6 / edge[0.2]) <= TOL
        st = full["expansion_ratio"]["balanced-init"]["plain"]["0.0"]
        assert (st["seeds"], st["held"]) == (4, False)
        assert abs(st["median"] - edge[0.2] / edge[0.4]) <= TOL  # plain's seed 3: ratio 0
        assert st["min"] == (edge[0.05] / edge[0.4] if unknown else st["median"])
        st = mini["expansion_ratio"]["plain"]["exact"]["0.0"]
        assert (st["seeds"], st["lower_bound"], st["held"]) == (1, True, True)
        assert abs(st["median"] - 1.6 / edge[0.1]) <= TOL
        st = mini["expansion_ratio"]["plain"]["penalty"]["0.0"]
        assert (st["seeds"], st["median"], st["interval"], st["held"]) == (0, None, None, None)
        assert "balanced-init" not in mini["expansion_ratio"]
        assert "exact" not in full["max_stable_lr"]


@pytest.mark.parametrize("s", [1e-5, 0.1234567, 12345678.0])
def test_an_initial_imbalance_is_printed_as_the_summary_key_it_stands_for(tmp_path, s):
    """The headline printed s to 6 significant digits (``0.123457`` for s = 0.1234567), so two
    imbalances that differ past them shared one label, and neither was the summary's."""
    summary, text = _render(tmp_path, _runs(s))
    assert list(
        summary["tasks"]["t@aaaaaaaa"]["regimes"]["sgd/full/10"]["max_stable_lr"]["plain"]
    ) == [str(s)]
    assert _headline_printed(text, summary) == _headline_expected(summary)


# -- the README block reads summary.json as written ----------------------------------------------
def _method_row(block: str, method: str) -> list[str]:
    return next(r[1:] for r in _table(block, "| method | wider than plain") if r[0] == method)


def test_the_readme_block_reads_a_summary_json_with_an_infinite_ratio(tmp_path):
    """plain's drift was infinite, so balance's suppression is infinite: summary.json writes its
    median and interval as null (held: true), and the block failed on them (TypeError)."""
    plain = [
        dataclasses.replace(r, log_ratio_rms=math.inf if r.log_ratio_rms is not None else None)
        for r in _cell("plain", 0.2, range(4))
    ]
    summary, text = _render(tmp_path, plain + _cell("balance", 0.4, range(4)))
    st = summary["tasks"]["t"]["regimes"]["sgd/full/10"]["drift_suppression"]["balance"]
    assert (st["median"], st["interval"], st["held"]) == (None, [None, None], True)
    assert "| t | full-batch sgd, 10 steps | balance | 0: 2 ✓ | - | n/a ✓ |" in text
    late = f"{2 * 4} / {len(LRS) * 4}"  # 0.8 and 1.6 diverge at step 5 of 10, on 4 seeds
    assert _method_row(readme.results_block(summary), "balance") == [
        "1 / 1",
        "-",
        "-",
        "1 / 1",
        late,
    ]


def _with_analyses(summary: dict, given: list, predicted: float | None) -> dict:
    """``summary`` with a min-sharpness entry (lambda_max as given per seed; balanced and found
    twice and half it) and a sharpness-at-the-edge entry (measured edge 0.5)."""
    starts = {
        str(k): {"given": g, "balanced": None if g is None else 2 * g,
                 "found": None if g is None else g / 2}
        for k, g in enumerate(given)
    }  # fmt: skip
    edge = {"strength": 0.0, "measured_edge": 0.5, "predicted_edge": predicted}
    return {
        **summary,
        "min-sharpness": {"t": starts},
        "sharpness_track": {"t": {"plain": {"0.0": edge}}},
    }


UNKNOWN = "PyTorch's default n/a, balanced point n/a, min-sharpness start n/a"


@pytest.mark.parametrize(
    ("given", "predicted", "line", "row"),
    [
        ([3.0, 1.0, 2.0], 0.25, "PyTorch's default 2, balanced point 4, min-sharpness start 1",
         "| t | 0 | plain | 0.25 | 0.5 | 2 |"),
        ([3.0, None, 2.0], None, UNKNOWN,
         "| t | 0 | plain | n/a | 0.5 | n/a |"),
        ([3.0, None, 2.0], 0.0, UNKNOWN,
         "| t | 0 | plain | 0 | 0.5 | n/a |"),
    ],
)  # fmt: skip
def test_the_readmes_sharpness_lines_read_null_values(tmp_path, given, predicted, line, row):
    """A seed's lambda_max that was not finite is null in summary.json, and so is a predicted
    edge 2 / lambda_max: the block failed on them (TypeError, ZeroDivisionError for an infinite
    lambda_max's edge 0). A median over seeds with one unknown is unknown (n/a)."""
    summary, _ = _render(tmp_path, _cell("plain", 0.2, range(2)))
    block = readme.results_block(_with_analyses(summary, given, predicted))
    assert f"on t (median of 3 seeds): {line}" in block
    assert row in block.splitlines()


def _realistic_row(text: str, method: str) -> list[str]:
    rows = _table(text, "| method | strength | stable edge")
    return next(r for r in rows if r[0] == method)


def test_the_realistic_tables_list_each_seeds_validation_loss_in_seed_order(tmp_path):
    """realistic.tuned listed each seed's validation loss in the store's row order: the report
    printed them in another order than the stable edges and summary.json."""
    runs = [
        _with(run_result("plain", lr, 0.4, seed=k, test_loss=0.1 * (k + 1)), task="char-gpt")
        for k in (1, 0)
        for lr in LRS
    ]
    summary, text = _render(tmp_path, runs)
    tuned = summary["realistic"]["char-gpt"]["sgd/full/10"]["plain"][0]
    losses = [tuned["val_loss_by_seed"][k] for k in sorted(tuned["val_loss_by_seed"], key=int)]
    assert losses == [0.1, 0.2]
    shown = f"{_num(tuned['val_loss'])} ({', '.join(_num(v) for v in losses)})"
    assert _realistic_row(text, "plain")[4] == shown


# -- stores without a comparison -----------------------------------------------------------------
def test_a_store_without_a_reference_is_not_said_to_hold_references_only(tmp_path):
    """balance and penalty without plain or balanced-init: the headline said the runs held "no
    method besides the references", the opposite of what they hold."""
    runs = _cell("balance", 0.4, range(2)) + _cell("penalty", 0.2, range(2), strength=0.1)
    summary, text = _render(tmp_path, runs)
    assert summary["verdicts"]["verdicts"] == 0
    assert all(not g["expansion_ratio"] for g in summary["tasks"]["t"]["regimes"].values())
    assert "no method besides the references" not in text
    assert "No comparison: no regime holds a reference (plain, balanced-init)" in text
    block = readme.results_block(summary)
    assert "no seeds judged per verdict" in block and "0 of the 0 verdicts" in block


# -- the README block of the published run -------------------------------------------------------
PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "figures" / "full-summary.json"
CONTINUOUS = ("penalty", "balanced-penalty", "exact", "balanced-exact", "exact-every-10",
              "decoupled-penalty", "balance")  # fmt: skip


def _interval(st: dict) -> str:
    return f"[{_num(st['interval'][0])}, {_num(st['interval'][1])}]"


def test_the_published_blocks_balanced_start_rows_are_its_held_verdicts():
    """Every row of "where continuous gauge fixing beat a balanced start" is a held verdict of
    a continuous method against balanced-init with its summary numbers, and the count is of
    every such verdict made."""
    summary = json.loads(PUBLISHED.read_text())
    made, held = 0, set()
    for task, t in summary["tasks"].items():
        for key, g in t["regimes"].items():
            for m, by_s in g["expansion_ratio"].get("balanced-init", {}).items():
                for s, st in by_s.items():
                    if m not in CONTINUOUS or st["held"] is None:
                        continue
                    made += 1
                    name = f"{m} ({g['best_strength'][m]:g})" if g["best_strength"][m] else m
                    if st["held"]:
                        row = (task, _label(key), name, _s(s), _ratio(st), _interval(st))
                        held.add(row)
    block = readme.results_block(summary)
    rows = _table(block, "| task | regime | method (strength) | s |")
    printed = {(t, r, m, float(s), ratio, i) for t, r, m, s, ratio, i in rows}
    assert len(printed) == len(rows) and printed == held
    assert f"{len(held)} of the {made} verdicts of {', '.join(CONTINUOUS)}" in block


def test_the_published_blocks_mechanism_rows_are_its_summarys():
    summary = json.loads(PUBLISHED.read_text())
    block = readme.results_block(summary)
    want = set()
    for task, t in summary["tasks"].items():
        for key, g in t["regimes"].items():
            for ref, by_m in g["expansion_ratio"].items():
                for m in set(by_m) & set(report.MECHANISM_METHODS):
                    marks = {
                        _s(s): f"{_ratio(st)} {MARKS[st['held']]}" for s, st in by_m[m].items()
                    }
                    want.add((task, _label(key), m, ref, json.dumps(marks, sort_keys=True)))
    got = set()
    for task, regime, comparison, cells in _table(block, "| task | regime | comparison | by s"):
        m, ref = (part.split(" (")[0] for part in comparison.split(" vs "))
        got.add((task, regime, m, ref, json.dumps(_by_s(cells), sort_keys=True)))
    assert got == want


def test_the_published_reports_headline_is_its_summarys():
    summary = json.loads(PUBLISHED.read_text())
    text = (PUBLISHED.parent / "full-report.md").read_text()
    assert _headline_printed(text, summary) == _headline_expected(summary)


def test_the_published_reports_sensitivity_marks_are_its_summarys():
    summary = json.loads(PUBLISHED.read_text())
    text = (PUBLISHED.parent / "full-report.md").read_text()
    rows = _table(text, "| task | regime | comparison | 2x/0.5")
    keys = [f"{f:g}x/{m:g}" for f in (2.0, 10.0, 1000.0) for m in (0.5, 0.9)]
    labels = {(t, _label(k)): k for t, v in summary["tasks"].items() for k in v["regimes"]}
    checked = 0
    for task, regime, comparison, *marks in rows:
        if task == "all":
            continue
        g = summary["tasks"][task]["regimes"][labels[(task, regime)]]
        m, ref = (part.split(" (")[0] for part in comparison.split(" vs "))
        by_def = g["verdicts_by_definition"]
        want = [
            "".join(
                MARKS[v] for _, v in sorted(by_def[k][ref][m].items(), key=lambda kv: _s(kv[0]))
            )
            for k in keys
        ]
        assert marks == want, (task, regime, comparison)
        checked += 1
    assert checked == sum(
        len(by_m)
        for t in summary["tasks"].values()
        for key, g in t["regimes"].items()
        if "/full/" in key
        for by_m in g["verdicts_by_definition"]["1000x/0.9"].values()
    )


def test_a_best_strength_is_printed_as_the_summary_value(tmp_path):
    """stability.label printed a best strength to 6 significant digits (0.1234567 as
    'penalty (0.123457)'), in the report's and the README's tables alike."""
    runs = _cell("plain", 0.2, range(4)) + _cell("penalty", 0.8, range(4), strength=0.1234567)
    summary, text = _render(tmp_path, runs + _cell("penalty", 0.4, range(4), strength=1.0))
    strength = summary["tasks"]["t"]["regimes"]["sgd/full/10"]["best_strength"]["penalty"]
    assert strength == 0.1234567
    (row,) = [r for r in _table(text, "| task | regime | method") if r[2].startswith("penalty")]
    assert float(row[2].removeprefix("penalty (").removesuffix(")")) == strength
