"""Quantization after orbit selection (``make bench``, section ``quant``).

Three models are trained here (no downloads): the digits MLP (64-256-10, ReLU), a MobileNet-style
CNN on the digits (a 3x3 stem, two residual blocks of a depthwise 3x3 and a pointwise 1x1 conv
with ReLU, no norms, global pooling, a linear head) and a character-level GPT (``zoo.GPT``:
LayerNorm, ReLU MLP) on the Python standard library's source, each from :data:`SEEDS` seeds;
seed 0's also "scrambled" by ``random_gauge_(scale=2)``: the same function, badly conditioned
for per-tensor quantization.

Each is then equalized (nothing; ``balance_``; ``equalize_`` with ``range`` and with
``activation``, alpha 0.5; Brevitas's ``EqualizeGraph`` and AIMET's cross-layer equalization
where they install and accept the model) and fake-quantized with torchao's affine quantization
primitives: per-tensor int8 weights, per-channel int4 weights, and W8A8 (per-tensor int8 weights,
per-tensor int8 inputs of every linear map and convolution with static scales from a
calibration batch). Weights of every ``nn.Linear`` and ``nn.Conv2d`` are quantized; embeddings,
biases and norms stay float. Classifiers report test accuracy (%), the GPT held-out loss (nats).
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from gaugefix import zoo
from gaugefix.experiments.tasks import load_task, python_source

# An interpreter with aimet-torch, whose torchvision needs another torch than this project's
# (make bench builds one in .venv-aimet): AIMET runs there, on a saved copy of the model.
AIMET_PYTHON = "AIMET_PYTHON"
# The models are trained and scored on one thread, whatever threads the timing is given: sums
# taken in another order train another model (the CNN trained on 2 threads scored 83.1% after
# range at per-channel int4 where the one trained on 1 thread scores 77.6%).
SCORING_THREADS = 1
SCRAMBLE = 2.0  # random_gauge_ scale of the scrambled models
# Trained copies of every model, from seeds 0 to SEEDS - 1 (seed 0's also scrambled): between
# methods on a trained model the scores differ by a few test digits, about as much as between
# two trainings of it, so range is compared with the anchors on every seed's model.
SEEDS, TINY_SEEDS = 5, 2
PAIRS = 3  # timed pairs (equalize_, 20 forward passes) on GPT-2 small
INT8, INT4 = (-127, 127), (-8, 7)
SCHEMES = ("fp32", "w8 per-tensor", "w4 per-channel", "w8a8")
METHODS = ("none", "balance_", "range", "activation", "brevitas", "aimet")


class SeparableCNN(nn.Module):
    """MobileNet-style, for 1x8x8 digits: stem, ``blocks`` residual depthwise-separable
    blocks with ReLU, global average pooling, a linear head. Each ReLU is its own ``nn.ReLU``
    module: both anchors find activations only as modules (with ``F.relu`` in ``forward`` they
    find nothing to equalize and leave the model unchanged, without a word), and gaugefix
    finds the same group either way."""

    def __init__(self, width: int = 32, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.depthwise = nn.ModuleList(
            nn.Conv2d(width, width, 3, padding=1, groups=width) for _ in range(blocks)
        )
        self.pointwise = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(blocks))
        self.head = nn.Linear(width, classes)
        self.stem_relu = nn.ReLU()
        self.inner_relu = nn.ModuleList(nn.ReLU() for _ in range(blocks))
        self.outer_relu = nn.ModuleList(nn.ReLU() for _ in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_relu(self.stem(x))
        blocks = zip(self.depthwise, self.pointwise, self.inner_relu, self.outer_relu, strict=True)
        for dw, pw, inner, outer in blocks:
            x = outer(x + pw(inner(dw(x))))
        return self.head(x.mean((2, 3)))


# -- models and data --------------------------------------------------------------------------


class Case:
    """A trained model, how to score it (higher is better for accuracy, lower for loss), its
    example input and a calibration batch."""

    def __init__(self, name: str, model: nn.Module, score: Callable[[nn.Module], float],
                 metric: str, example: Tensor, calibration: Tensor) -> None:  # fmt: skip
        self.name, self.model, self.score, self.metric = name, model, score, metric
        self.example, self.calibration = example, calibration


def _train(model: nn.Module, batches: Callable[[int], tuple[Tensor, Tensor]], steps: int,
           lr: float) -> nn.Module:  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        x, y = batches(step)
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
    return model.eval()


def _accuracy(x: Tensor, y: Tensor) -> Callable[[nn.Module], float]:
    def score(model: nn.Module) -> float:
        with torch.no_grad():
            return 100 * float((model(x).argmax(-1) == y).double().mean())

    return score


def digits_cases(tiny: bool, seed: int = 0) -> list[Case]:
    """The digits MLP and CNN, initialised from ``seed`` and trained full-batch."""
    task = load_task("digits")
    x, y, xt, yt = task.x.float(), task.y, task.x_test.float(), task.y_test
    steps = 30 if tiny else 400
    torch.manual_seed(seed)
    mlp = _train(zoo.mlp((64, 256, 10)), lambda _: (x, y), steps, 3e-3)
    torch.manual_seed(seed)
    img, img_t = x.view(-1, 1, 8, 8), xt.view(-1, 1, 8, 8)
    cnn = _train(SeparableCNN(), lambda _: (img, y), steps, 3e-3)
    return [
        Case("digits MLP", mlp, _accuracy(xt, yt), "accuracy %", x[:2], x[:256]),
        Case("digits separable CNN", cnn, _accuracy(img_t, yt), "accuracy %", img[:2], img[:256]),
    ]


def gpt_case(tiny: bool, seed: int = 0, layers: int = 2, dim: int = 64, steps: int = 600) -> Case:
    """A byte-level GPT (``layers`` x ``dim``, 4 heads, context 64), initialised from ``seed`` and
    trained ``steps`` AdamW steps of 32 windows drawn from ``seed``; scored by the cross-entropy on
    64 fixed windows of held-out text (the last tenth)."""
    data = torch.tensor(list(python_source(200_000 if tiny else 2_000_000)), dtype=torch.long)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    context, gen = 64, torch.Generator().manual_seed(seed)

    def windows(source: Tensor, count: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        start = torch.randint(0, len(source) - context - 1, (count,), generator=g)
        idx = start[:, None] + torch.arange(context + 1)
        return source[idx[:, :-1]], source[idx[:, 1:]]

    torch.manual_seed(seed)
    model = zoo.GPT(vocab=256, dim=dim, heads=4, layers=layers, context=context)
    _train(model, lambda _: windows(train, 32, gen), 40 if tiny else steps, 3e-3)
    test_x, test_y = windows(held, 64, torch.Generator().manual_seed(1))

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            out = m(test_x)
            return float(F.cross_entropy(out.reshape(-1, 256), test_y.reshape(-1)))

    calib, _ = windows(train, 16, torch.Generator().manual_seed(2))
    return Case(f"char GPT ({layers} x {dim})", model, loss, "loss", calib[:1], calib)


def channel_outliers(model: nn.Module, calibration: Tensor) -> dict[str, float]:
    """Per ``nn.Linear``: the largest per-channel ``max |x_j|`` of its input over the calibration
    batch divided by their median over channels (the outlier channels SmoothQuant migrates)."""
    peaks: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, args, n=n: peaks.__setitem__(n, args[0].abs().flatten(0, -2).amax(0))
        )
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(calibration)
    for hook in hooks:
        hook.remove()
    return {n: float(p.max() / p.median()) for n, p in peaks.items()}


# -- quantization (torchao's affine primitives) -------------------------------------------------


def fake_quant(t: Tensor, block: tuple[int, ...], qrange: tuple[int, int]) -> Tensor:
    """Symmetric affine quantization of ``t`` with one scale per ``block`` (torchao), then
    dequantized: what the quantized model computes with, in float32."""
    from torchao.quantization import quant_primitives as qp

    t32 = t.detach().float()
    scale, zero = qp.choose_qparams_affine(t32, qp.MappingType.SYMMETRIC, block, torch.int8,
                                           *qrange)  # fmt: skip
    q = qp.quantize_affine(t32, block, scale, zero, torch.int8, *qrange)
    return qp.dequantize_affine(q, block, scale, zero, torch.int8, *qrange,
                                output_dtype=torch.float32)  # fmt: skip


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def static_input_ranges(model: nn.Module, calibration: Tensor) -> dict[str, float]:
    """``max |x|`` over the calibration batch of every quantized layer's input."""
    ranges: dict[str, float] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, args, n=n: ranges.__setitem__(
                n, max(ranges.get(n, 0.0), float(args[0].abs().max()))
            )
        )
        for n, m in _quantized_layers(model)
    ]
    with torch.no_grad():
        model(calibration)
    for hook in hooks:
        hook.remove()
    return ranges


def quantized(model: nn.Module, scheme: str, calibration: Tensor) -> nn.Module:
    """A copy of ``model`` with the weights (and for ``w8a8`` the layer inputs) of ``scheme``."""
    out = copy.deepcopy(model)
    if scheme == "fp32":
        return out
    ranges = static_input_ranges(out, calibration) if scheme == "w8a8" else {}
    with torch.no_grad():
        for name, m in _quantized_layers(out):
            w = m.weight
            if scheme == "w4 per-channel":
                m.weight.copy_(fake_quant(w, (1, *w.shape[1:]), INT4))
            else:
                m.weight.copy_(fake_quant(w, tuple(w.shape), INT8))
            if scheme == "w8a8":
                m.register_forward_pre_hook(_input_quantizer(ranges[name] / INT8[1]))
    return out


def _input_quantizer(step: float) -> Callable:
    """A pre-hook rounding a layer's input to the int8 grid of ``step`` (static scale)."""
    from torchao.quantization import quant_primitives as qp

    scale, zero = torch.tensor([step]), torch.zeros(1, dtype=torch.int32)

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        q = qp.quantize_affine(x, tuple(x.shape), scale, zero, torch.int8, *INT8)
        return (qp.dequantize_affine(q, tuple(x.shape), scale, zero, torch.int8, *INT8),)

    return hook


# -- equalization -------------------------------------------------------------------------------


def equalized(case: Case, model: nn.Module, method: str) -> nn.Module:
    """A copy of ``model`` equalized by ``method``; raises when the method refuses the model."""
    out = copy.deepcopy(model)
    if method == "none":
        return out
    if method in ("brevitas", "aimet"):
        return (_brevitas if method == "brevitas" else _aimet)(out, case.example)
    structure = gaugefix.discover(out, case.example)
    if method == "balance_":
        gaugefix.balance_(out, structure)
    else:
        calibration = case.calibration if method == "activation" else None
        result = gaugefix.equalize_(out, structure, method, calibration=calibration)
        if not result.converged:
            raise RuntimeError(f"equalize_ did not converge ({result})")
    return out


def _brevitas(model: nn.Module, example: Tensor) -> nn.Module:
    """Brevitas's cross-layer equalization with its defaults, on the FX graph of ``model``."""
    from brevitas.fx import symbolic_trace
    from brevitas.graph.equalize import EqualizeGraph

    return EqualizeGraph().apply(symbolic_trace(model))


def _aimet(model: nn.Module, example: Tensor) -> nn.Module:
    """AIMET's cross-layer equalization (``equalize_model``) on ``model``: in this process, or,
    when the environment variable :data:`AIMET_PYTHON` names an interpreter (``make bench``'s
    AIMET environment), in that one (:mod:`benchmarks.aimet_cle`), the result loaded back."""
    python = os.environ.get(AIMET_PYTHON)
    if not python:
        from aimet_torch.cross_layer_equalization import equalize_model

        equalize_model(model, dummy_input=example)
        return model
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp, "model.pt"), Path(tmp, "equalized.pt")
        torch.save({"model": model, "example": example}, source)
        command = [python, str(Path(__file__).with_name("aimet_cle.py")), str(source), str(target)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            lines = done.stderr.strip().splitlines()
            raise RuntimeError(f"in {python}: {lines[-1] if lines else done.returncode}")
        model.load_state_dict(torch.load(target))
    return model


# -- the measurements ---------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def output_change(before: nn.Module, after: nn.Module, x: Tensor) -> float:
    """``max |f_after(x) - f(x)| / max |f(x)|`` in float32 (the equalized model's function)."""
    with torch.no_grad():
        y, z = before(x), after(x)
    z = z if isinstance(z, Tensor) else z[0]
    return float((z - y).abs().max() / y.abs().max())


def measure(case: Case, model: nn.Module, method: str) -> dict:
    """One method on one model: its status, time, output change and every scheme's score."""
    start = time.perf_counter()
    try:
        out = equalized(case, model, method)
    except Exception as err:  # an anchor that refuses the model: say exactly why
        return {"status": _first_line(err)}
    row = {"status": "ok", "seconds": time.perf_counter() - start}
    row["output_change"] = output_change(model, out, case.calibration)
    for scheme in SCHEMES:
        row[scheme] = case.score(quantized(out, scheme, case.calibration))
    return row


def run_case(case: Case, log: Callable[[str], None],
             variants: tuple[str, ...] = ("trained", "scrambled")) -> list[dict]:  # fmt: skip
    """Every method on ``case``'s model in each of ``variants``: one row per variant."""
    rows = []
    for variant in variants:
        model = copy.deepcopy(case.model)
        if variant == "scrambled":
            structure = gaugefix.discover(model, case.example)
            gen = torch.Generator().manual_seed(0)
            gaugefix.random_gauge_(model, structure, SCRAMBLE, generator=gen)
        methods = {m: measure(case, model, m) for m in METHODS}
        rows.append({"model": case.name, "variant": variant, "metric": case.metric,
                     "methods": methods})  # fmt: skip
        for m, r in methods.items():
            shown = ", ".join(f"{s} {r[s]:.2f}" for s in SCHEMES if s in r)
            log(f"  {case.name} {variant} {m}: {shown or r['status']}")
    return rows


def _median_pair_ratio(a: Callable[[], None], b: Callable[[], None], pairs: int) -> float:
    """The median over ``pairs`` of time(a) / time(b), alternating which runs first."""
    ratios = []
    for i in range(pairs):
        times = {}
        for name, f in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
            start = time.perf_counter()
            f()
            times[name] = time.perf_counter() - start
        ratios.append(times["a"] / times["b"])
    return sorted(ratios)[len(ratios) // 2]


def gpt2_timing(tiny: bool, log: Callable[[str], None]) -> dict:
    """``equalize_`` on GPT-2 small (Hugging Face default config, random weights; sequence 64,
    batch 1) against 20 forward passes: ``range`` alone, and ``activation`` with its
    calibration pass (on the same 64 tokens). Every timed call equalizes its own copy of the
    random weights (equalizing an already equalized model is cheaper)."""
    import transformers

    config = transformers.GPT2Config(**({"n_layer": 2, "n_embd": 64, "n_head": 4} if tiny else {}))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    structure = gaugefix.discover(model, ids)

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(20):
                model(ids)

    out = {"parameters": sum(p.numel() for p in model.parameters())}
    for objective in ("range", "activation"):
        calibration = ids if objective == "activation" else None
        fresh = [copy.deepcopy(model) for _ in range(PAIRS)]  # every call from the random weights

        def run(objective: str = objective, calibration: Tensor | None = calibration,
                fresh: list = fresh) -> None:  # fmt: skip
            gaugefix.equalize_(fresh.pop(), structure, objective, calibration=calibration)

        out[objective] = _median_pair_ratio(run, forwards, PAIRS)
        log(f"  GPT-2 {objective}: {out[objective]:.2f} x 20 forward passes")
    return out


def run(tiny: bool = False, log: Callable[[str], None] = print) -> dict:
    """The scores (trained and measured on :data:`SCORING_THREADS` threads), the GPT's channel
    outliers and the GPT-2 small timing (on the threads the section was given)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(SCORING_THREADS)
    try:
        cases = _cases(tiny, 0)
        rows = [row for case in cases for row in run_case(case, log)]
        outliers = channel_outliers(cases[-1].model, cases[-1].calibration)
        seeds = [{**row, "seed": 0} for row in rows if row["variant"] == "trained"]
        for seed in range(1, TINY_SEEDS if tiny else SEEDS):
            log_seed = lambda line, seed=seed: log(f"{line} (seed {seed})")  # noqa: E731
            for case in _cases(tiny, seed):
                seeds += [{**row, "seed": seed} for row in run_case(case, log_seed, ("trained",))]
    finally:
        torch.set_num_threads(threads)
    log("  char GPT, per-channel input range max/median: "
        + ", ".join(f"{n} {r:.1f}" for n, r in outliers.items()))  # fmt: skip
    return {"cases": rows, "seeds": seeds, "gpt_outliers": outliers,
            "gpt2_timing": gpt2_timing(tiny, log)}  # fmt: skip


def _cases(tiny: bool, seed: int) -> list[Case]:
    """The three models, initialised (and the GPT's batches drawn) from ``seed``."""
    return [*digits_cases(tiny, seed), gpt_case(tiny, seed)]


# -- the figures for the README table -----------------------------------------------------------

TARGETS = {"w8_range_accuracy_drop": 0.3, "w8_range_loss_increase": 0.01, "gpt2_ratio": 1.0}


def _against_anchors(rows: list[dict]) -> list[tuple]:
    """``range`` minus each anchor that accepted every one of ``rows`` (one model and variant,
    a row per seed): per scheme the mean over the rows of the difference in score (signed so
    that above 0 favours ``range``), at the scheme where that mean is least."""
    first, out = rows[0], []
    sign, unit = (-1, "nats") if first["metric"] == "loss" else (1, "points")
    places = _digits(first["metric"])
    for anchor in ("brevitas", "aimet"):
        runs = [r["methods"] for r in rows]
        if any(m[anchor]["status"] != "ok" for m in runs):
            continue
        diffs = {s: [sign * (m["range"][s] - m[anchor][s]) for m in runs] for s in SCHEMES[1:]}
        scheme = min(diffs, key=lambda s: statistics.fmean(diffs[s]))
        d = diffs[scheme]
        same = all(m[anchor]["output_change"] == 0 for m in runs)
        left = " (it left the model unchanged)" if same else ""
        which, detail = f"{first['model']}, {first['variant']}", first["metric"]
        if len(d) > 1:
            which += f", mean over {len(d)} seeds"
            detail += (f"; {scheme}: range >= {anchor} on {sum(v >= 0 for v in d)} of {len(d)} "
                       f"seeds, per seed {min(d):+.{places}f} to {max(d):+.{places}f}")  # fmt: skip
        what = f"{which}: range minus {anchor}{left}, worst scheme ({detail})"
        out.append((what, statistics.fmean(d), 0.0, "min", unit))
    return out


def figures(results: dict) -> list[dict]:
    """``(what, figure, target, kind, unit)`` rows: per-tensor int8 after ``range`` on the
    scrambled models against FP32 (and without equalization, for information); ``range``
    against the anchors on the models they accept (the trained models over every seed); and
    ``activation`` against ``range`` and no equalization under W8A8 on the GPT; the GPT-2
    small timing."""
    rows, out = results["cases"], []
    for row in [r for r in rows if r["variant"] == "scrambled"]:
        name, ms = row["model"], row["methods"]
        fp32, w8 = ms["none"]["fp32"], "w8 per-tensor"
        if row["metric"] == "loss":
            out.append((f"{name}, scrambled: per-tensor int8 after range, loss increase over "
                        f"FP32 (none: {ms['none'][w8] / fp32 - 1:+.1%})",
                        ms["range"][w8] / fp32 - 1, TARGETS["w8_range_loss_increase"], "max",
                        "%"))  # fmt: skip
            best = min(ms["range"]["w8a8"], ms["none"]["w8a8"])
            worst = max(results["gpt_outliers"].values())
            out.append((f"{name}, scrambled: W8A8 loss, activation vs the better of range and "
                        f"none (largest per-channel input range / median: {worst:.1f})",
                        ms["activation"]["w8a8"] - best, 0.0, "max", "nats"))  # fmt: skip
        else:
            out.append((f"{name}, scrambled: per-tensor int8 after range, accuracy drop from "
                        f"FP32 (none: {fp32 - ms['none'][w8]:.2f} points)",
                        fp32 - ms["range"][w8], TARGETS["w8_range_accuracy_drop"], "max",
                        "points"))  # fmt: skip
    seeds = results["seeds"]
    for model in dict.fromkeys(r["model"] for r in rows):
        out += _against_anchors([r for r in seeds if r["model"] == model])
        out += _against_anchors([r for r in rows if r["model"] == model
                                 and r["variant"] == "scrambled"])  # fmt: skip
    timing = results["gpt2_timing"]
    for objective in ("range", "activation"):
        out.append((f"equalize_ {objective} on GPT-2 small ({timing['parameters'] / 1e6:.0f}M) "
                    "/ 20 forward passes (batch 1, 64 tokens)", timing[objective],
                    TARGETS["gpt2_ratio"], "max", "x"))  # fmt: skip
    return [dict(zip(("what", "figure", "target", "kind", "unit"), r, strict=True)) for r in out]


def render(results: dict) -> str:
    """The full table of scores, one line per model, variant and method (seed 0's models),
    then the trained models' over every seed."""
    lines = ["| model | variant | method | FP32 | " + " | ".join(SCHEMES[1:]) + " |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in results["cases"]:
        for method, r in row["methods"].items():
            if r["status"] != "ok":
                cells = [f"refused: {r['status']}"] + [""] * 3
            else:
                digits = _digits(row["metric"])
                cells = [f"{r[s]:.{digits}f}" for s in SCHEMES]
            lines.append(f"| {row['model']} ({row['metric']}) | {row['variant']} | {method} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines + ["", *_render_seeds(results["seeds"])]) + "\n"


def _render_seeds(seeds: list[dict]) -> list[str]:
    """The trained models' scores over seeds: mean [min, max] per model, method and scheme."""
    count = len({r["seed"] for r in seeds})
    lines = [f"Trained models over {count} seeds (seed 0's above): mean [min, max].", "",
             "| model | method | FP32 | " + " | ".join(SCHEMES[1:]) + " |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in seeds):
        rows = [r for r in seeds if r["model"] == model]
        digits = _digits(rows[0]["metric"])
        for method in METHODS:
            runs = [r["methods"][method] for r in rows]
            refused = [m["status"] for m in runs if m["status"] != "ok"]
            if refused:
                cells = [f"refused: {refused[0]}", "", "", ""]
            else:
                cells = [_spread([m[s] for m in runs], digits) for s in SCHEMES]
            lines.append(f"| {model} ({rows[0]['metric']}) | {method} | " + " | ".join(cells)
                         + " |")  # fmt: skip
    return lines


def _digits(metric: str) -> int:
    """Decimals shown: losses differ in the fourth, accuracies move in 0.22-point steps."""
    return 4 if metric == "loss" else 2


def _spread(values: list[float], digits: int) -> str:
    """``mean [min, max]`` of ``values``."""
    mean, low, high = statistics.fmean(values), min(values), max(values)
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
