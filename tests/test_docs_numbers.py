"""The numbers and signatures README.md and docs/*.md state about the code are the code's: the
defaults they quote, the constants they name (tolerances, bounds, seeds, rounds) and counts a
small computation gives. Each test renders the statement from the code and looks for it in the
document, so a default that changes, or a document that drifts from it, fails here."""

from __future__ import annotations

import ast
import builtins
import contextlib
import inspect
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import gaugefix
from gaugefix import cli, diagnostics, kernels, moment, step, verification
from gaugefix.experiments import engine, plan, runner, stability
from gaugefix.integrations import common

ROOT = Path(__file__).resolve().parents[1]


def text(name: str) -> str:
    """The document ``name`` (relative to the repository), its lines joined by single spaces, so
    that a statement wrapped over lines is found whole."""
    return " ".join((ROOT / name).read_text().split())


def literal(value: object) -> str:
    """``value`` as the documents write it: strings in double quotes, numbers as Python writes
    them but exponents without a leading zero (``1e-9``, not ``1e-09``)."""
    if isinstance(value, str):
        return f'"{value}"'
    return re.sub(r"e([+-])0(\d)", r"e\1\2", repr(value))


def rendered(name: str, function: object, skip: int = 0) -> str:
    """``name(parameters)`` as the documents write a signature: each parameter's name, with
    ``=default`` where it has one, ``*`` before the keyword-only ones, ``**name`` for the rest
    (the first ``skip`` parameters, such as ``self``, left out)."""
    parts, star = [], False
    for p in list(inspect.signature(function).parameters.values())[skip:]:
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={literal(p.default)}")
    return f"{name}({', '.join(parts)})"


def defaults(function: object) -> dict[str, object]:
    return {
        n: p.default
        for n, p in inspect.signature(function).parameters.items()
        if p.default is not p.empty
    }


def test_rendered_signatures_are_found_only_when_they_agree():
    def f(a, b=0.5, *, c="x", **options): ...

    assert rendered("f", f) == 'f(a, b=0.5, *, c="x", **options)'
    assert rendered("f", f, skip=1) == 'f(b=0.5, *, c="x", **options)'
    assert literal(1e-10) == "1e-10" and literal(1e-9) == "1e-9" and literal(None) == "None"


def _callbacks():
    lightning = pytest.importorskip("gaugefix.integrations.lightning")
    transformers = pytest.importorskip("gaugefix.integrations.transformers")
    return lightning.GaugeFixingCallback, transformers.GaugeFixingCallback


@pytest.mark.parametrize(
    ("document", "name", "function", "skip"),
    [
        ("docs/quantization.md", "equalize_", gaugefix.equalize_, 0),
        ("docs/soft_gauge_fixing.md", "gaugefix.relax_", gaugefix.relax_, 0),
        ("docs/soft_gauge_fixing.md", "gaugefix.GaugeFixing", gaugefix.GaugeFixing.__init__, 1),
        ("docs/soft_gauge_fixing.md", "GaugeFixingCallback", "lightning", 1),
        ("docs/soft_gauge_fixing.md", "GaugeFixingCallback", "transformers", 1),
    ],
    ids=["equalize_", "relax_", "GaugeFixing", "lightning-callback", "trainer-callback"],
)
def test_the_signatures_the_docs_write_out_are_the_codes(document, name, function, skip):
    if isinstance(function, str):
        lightning, transformers = _callbacks()
        function = (lightning if function == "lightning" else transformers).__init__
    assert rendered(name, function, skip) in text(document)


STEP_CALLS = {
    "sgd(lr, momentum=0.0)": step.sgd,
    "adam(lr, betas=(0.9, 0.999), eps=1e-8)": step.adam,
    "adamw(lr, ..., weight_decay=0.01)": step.adamw,
    "exact(step, structure, lr=..., strength=..., every=10)": step.exact,
}


def quoted_defaults(call: str) -> dict[str, object]:
    """The keyword arguments of ``call`` whose values are literals (not ``...``)."""
    keywords = ast.parse(call, mode="eval").body.keywords
    values = {k.arg: ast.literal_eval(k.value) for k in keywords}
    return {k: v for k, v in values.items() if v is not Ellipsis}


@pytest.mark.parametrize("call", list(STEP_CALLS))
def test_gaugefix_steps_defaults_are_those_the_docs_quote(call):
    assert call in text("docs/soft_gauge_fixing.md")
    quoted = quoted_defaults(call)
    assert quoted
    assert quoted == {k: defaults(STEP_CALLS[call])[k] for k in quoted}


def test_the_callback_options_defaults_are_those_the_docs_list():
    callback = types.SimpleNamespace()
    common.set_options(callback, 1.0, {})
    doc = text("docs/soft_gauge_fixing.md")
    listed = (
        f"`structure={callback.structure}`, `mode={literal(callback.mode)}`, "
        f"`balance_at_start={callback.balance_at_start}`, `prefix={literal(callback.prefix)}` "
        f"and `every=None` ({callback.every} in exact mode;"
    )
    assert listed in doc


def test_the_default_interval_between_orbit_steps():
    assert step.EVERY == defaults(step.exact)["every"]
    assert f"after every `every`-th step (default {step.EVERY})" in text(
        "docs/soft_gauge_fixing.md"
    )
    assert f"at its default `every = {step.EVERY}`" in text("docs/experiments.md")
    doc = text("docs/soft_gauge_fixing.md")
    assert f"(`every`: {step.EVERY} in exact mode, 1 in penalty mode)" in doc


def test_balance_tolerance_in_the_readme_table():
    tol = literal(defaults(gaugefix.balance_)["tol"])
    row = (
        "| `balance_` | hard gauge fixing: Newton on the convex norm along the orbit, to "
        f"`max mu/S <= {tol}` |"
    )
    assert row in text("README.md")


def test_equalize_defaults_in_the_prose():
    doc = text("docs/quantization.md")
    assert f"with the default `tol={literal(defaults(gaugefix.equalize_)['tol'])}`" in doc
    alpha = gaugefix.equalize.DEFAULT_ALPHA  # equalize_'s alpha=None for "activation"
    assert defaults(gaugefix.equalize_)["alpha"] is None
    assert f"`--alpha` is SmoothQuant's exponent (default {alpha})" in doc
    assert f'`alpha` is read by `"activation"` only (default {alpha};' in doc
    objective = defaults(cli.balance)["objective"]
    assert f"`--objective {objective}` (the default)" in doc


def test_verify_tolerance_and_its_forward_bound():
    doc = text("docs/generators.md")
    tolerance = literal(verification.VERIFY_TOLERANCE)
    assert f"more than `result.tolerance` (`{tolerance}` relative)" in doc
    source = inspect.getdoc(gaugefix.verify)
    assert "at most ``5 + 4 k ceil(log2 N)``" in " ".join(source.split())
    assert "at most `5 + 4 k ceil(log2 N)`" in " ".join(doc.split())


def test_relaxation_rates_defaults():
    doc = text("docs/coordinates.md")
    assert f"(`k` defaults to {diagnostics.EXTREME_RATES})" in doc
    limit = defaults(gaugefix.relaxation_rates)["dense_limit"]
    assert f"k=None, dense_limit={limit})" in doc
    assert f"at `-{literal(diagnostics.SHIFT)} max_n S_n`" in doc


def test_sharpness_and_coordinates_calls_show_the_defaults():
    doc = text("docs/coordinates.md")
    d = defaults(gaugefix.sharpness)
    assert (
        f"sharpness(model, loss_fn, x, y, iters={d['iters']}, tol={literal(d['tol'])}, "
        f"krylov_dim={d['krylov_dim']}, seed={d['seed']})"
    ) in doc
    d = defaults(gaugefix.gauge_coordinates)
    assert (
        f"gauge_coordinates(model, structure, allow_dead={d['allow_dead']}, "
        f"tol={literal(d['tol'])}, max_iter={d['max_iter']})"
    ) in doc
    assert f'onto="vertical", rtol={literal(defaults(gaugefix.project)["rtol"])})' in doc


def test_the_readmes_limits_of_a_sweep():
    readme = text("README.md")
    assert (
        f"A grid of more than {cli.LARGE_RUNS:,} runs, or estimated to take more than "
        f"{cli.LARGE_SECONDS // 3600} hours, is refused"
    ) in readme
    seconds = runner.WORK_BUDGET / runner.WORK_RATE
    assert f"a batch is bounded to about {seconds:.0f} seconds of one core's work" in readme


def test_the_experiments_definitions_constants():
    doc = text("docs/experiments.md")
    assert f"until `hi / lo <= {stability.BISECTION_BRACKET}`" in doc
    assert plan.BISECTION_ROUNDS == 4 and "(four rounds from the full grid's ratio 2" in doc
    assert plan.QUICK_BISECTION_ROUNDS == 1 and "reproduction does one round, for time" in doc
    resamples = stability.BOOTSTRAP_RESAMPLES
    assert f"{round(100 * stability.CONFIDENCE)}% interval" in doc
    assert f"with replacement {resamples} times from a fixed numpy seed" in doc
    assert f"(torch seed `k + {engine.REPLICA_SEED}`)" in doc
    assert f"seeds 0-{stability.TUNING_SEEDS - 1} together" in doc
    readme = text("README.md")
    assert f"final training loss is at most {engine.STABILITY_MARGIN} of both" in readme
    assert f"chosen on seeds 0-{stability.TUNING_SEEDS - 1} and judged on the others" in readme
    seeds = (plan.SEEDS, plan.COSTLY_SEEDS, plan.REALISTIC_SEEDS)
    assert seeds == (10, 5, 3)
    assert "10 seeds per cell on the MLP tasks, 5 on the CNN and the transformer and 3 on" in readme


def test_the_quick_grid_has_the_runs_the_docs_count():
    grids = plan.reproduce_grids(quick=True)
    runs = sum(len(g.configs(runner.TaskSpec(g.task))) for g in grids)
    assert f"trains {runs} runs on its grid" in text("docs/experiments.md")


def test_the_fuzzed_architectures_count_of_the_installed_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto import modeling_auto

    documented = re.search(
        r"\((\d+) in transformers ([\d.]+);", text("docs/quantization.md")
    )  # fmt: skip
    assert documented
    if not transformers.__version__.startswith(documented.group(2)):
        pytest.skip(f"the count is of transformers {documented.group(2)}")
    every = set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(
        modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    assert len(every) == int(documented.group(1))


def test_the_imbalance_statistics_table_lists_every_key():
    doc = (ROOT / "docs" / "soft_gauge_fixing.md").read_text()
    section = doc[doc.index("## Imbalance statistics") :]
    table = section[: section.index("\n\n", section.index("| key | value |"))]
    keys = re.findall(r"`(\w+)`", " ".join(re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE)))
    assert keys == list(moment.STAT_NAMES)


def test_the_readme_names_every_error_class():
    row = re.search(r"^\| `GaugefixError` \|(.*)$", (ROOT / "README.md").read_text(), re.MULTILINE)
    named = [n for n in re.findall(r"`([A-Z]\w+)`", row.group(1)) if not hasattr(builtins, n)]
    errors = {
        n
        for n in gaugefix.__all__
        if isinstance(getattr(gaugefix, n), type) and issubclass(getattr(gaugefix, n), Exception)
    }
    assert sorted(named) == sorted(errors - {"GaugefixError"})


def test_the_readmes_duration_of_make_bench_is_the_sum_of_its_latest_runs():
    """``benchmarks/results.json`` keeps, for each section, the run that measured it last; a
    run that measured only a skipped section (``cuda`` without a GPU) spent its time on others
    since remeasured. The README rounds the sum to ten minutes."""
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    measured = [
        r
        for r in results["runs"]
        if any("skipped" not in results[s] for s in r["sections"])
    ]  # fmt: skip
    minutes = 10 * round(sum(r["seconds"] for r in measured) / 600)
    assert f"`make bench` (about {minutes} minutes on the 2-core machine" in text("README.md")


WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def test_gpt2s_groups_and_batches_of_the_gpu_layout():
    """The README and docs/soft_gauge_fixing.md count GPT-2's groups of equally shaped
    parameters and the batches their dense factors take; neither depends on depth or width
    (the vocabulary's embedding is the largest group at any width)."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT))
    from benchmarks.opcount import gpt2

    structure = gaugefix.discover(gpt2(2, 64), torch.randint(0, 50257, (1, 16)))
    layout = kernels.kernel_plan(structure, torch.device("cpu"))
    groups, batches = WORDS[len(layout.groups)], WORDS[len(layout.batches)]
    assert f"GPT-2's {groups} groups take {batches} batches" in text("README.md")
    assert f"(GPT-2: {batches} batches of its {groups} groups)" in text("docs/soft_gauge_fixing.md")


def _constants(test_file: str) -> dict[str, object]:
    """The module-level ``NAME = literal`` assignments of a test file, and ``len(ARCHS)``."""
    tree = ast.parse((ROOT / "tests" / test_file).read_text())
    out: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "ARCHS":
                out["archs"] = len(node.value.keys)
            else:
                with contextlib.suppress(ValueError):
                    out[name] = ast.literal_eval(node.value)
    return out


def test_the_held_out_sweeps_the_docs_describe():
    first, second = _constants("test_hf_sweep_audit.py"), _constants("test_hf_heldout2.py")
    third, fourth = _constants("test_hf_heldout3.py"), _constants("test_hf_heldout4.py")
    doc = " ".join(text("docs/generators.md").split())
    count = first["archs"] + second["archs"] + third["archs"] + fourth["archs"]
    assert f"Four held-out sweeps in the test suite discover {count} Hugging Face" in doc
    assert f"(of scale 3 in one, {second['SCALE']} in the others)" in doc
    for later in ("test_hf_heldout3.py", "test_hf_heldout4.py"):
        assert "from test_hf_heldout2 import (" in (ROOT / "tests" / later).read_text()
    assert "random_gauge_(model, s, 3.0," in (ROOT / "tests" / "test_hf_sweep_audit.py").read_text()
    assert first["TOL"] == second["TOL"] == 1e-10 and second["POW2_TOL"] == 1e-12
    assert "within `1e-10` of the original (and within `1e-12` under a gauge of powers" in doc
    assert "of two, in the second to fourth)" in doc


SOFT_ROWS = {
    "added by an exact orbit step": "exact_added",
    "added by the penalty gradient": "penalty_added",
    "`imbalance_stats_tensor` / `imbalance_stats`": "imbalance_stats",
}


@pytest.mark.parametrize("row", list(SOFT_ROWS))
def test_the_gpu_cost_tables_operation_counts_match_the_code(row):
    """docs/soft_gauge_fixing.md's table of what a step dispatches in the GPU layout, counted
    again now (as tests/test_readme_truth.py does for the README's)."""
    from test_readme_truth import gpt2_counts

    doc = (ROOT / "docs" / "soft_gauge_fixing.md").read_text()
    match = re.search(rf"^\| {re.escape(row)} \| (\d+), the same at 2 layers \|", doc, re.M)
    assert match, row
    assert gpt2_counts()[SOFT_ROWS[row]] == int(match.group(1))


def _first_column(doc: str, header: str) -> list[str]:
    """The backticked names of the first column of the table of ``doc`` under ``header``."""
    table = doc[doc.index(header) :].split("\n\n", 1)[0]
    return re.findall(r"^\| `([\w-]+)` \|", table, re.MULTILINE)


def test_the_experiments_tables_list_every_task_and_method():
    doc = (ROOT / "docs" / "experiments.md").read_text()
    tasks = [g.task for g in plan.reproduce_grids(quick=False)]
    assert sorted(_first_column(doc, "| task | data | model | loss |")) == sorted(tasks)
    methods = _first_column(doc, "| method | starts from | at every step |")
    assert sorted(methods) == sorted(engine.METHODS)


def test_the_state_discover_restores_is_bounded_as_the_docs_say():
    bound = sys.modules["gaugefix.structure.module_state"].STATE_OBJECTS
    assert f"the {bound:,} nearest the modules" in " ".join(text("docs/generators.md").split())
