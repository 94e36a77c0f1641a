"""Does balancing a trained network before per-tensor int8 weight quantization help? Measured.

    python examples/balance_quantize.py [--seeds 5] [--steps 300] [--out DIR]

For each seed and initial imbalance ``s`` (0: PyTorch's default initialisation; 1: the same
initialisation moved along its orbit, every hidden neuron by a factor ``e^{+-1}``, the function
unchanged), the digits MLP (64-256-10, ReLU; the built-in ``digits`` task) is trained with
full-batch SGD with momentum and written as ``trained-s{s}-seed{seed}.safetensors`` into DIR; the
``gaugefix balance`` command balances it into ``balanced-...safetensors``. Both are then quantized
per tensor, symmetrically, to int8: every weight matrix ``W`` becomes ``q * d`` with
``d = max|W| / 127`` and ``q = round(W / d)`` in ``[-127, 127]`` (biases stay float32). On the
test split it prints, per run, the relative output error ``||f_int8(X) - f(X)||_F / ||f(X)||_F``
(logits, evaluated in float64) and the test accuracy of the float32 and int8 networks, then the
medians over seeds. The last line is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import gaugefix
from gaugefix.cli import app
from gaugefix.experiments.tasks import load_task
from gaugefix.zoo import mlp


def digits_mlp() -> nn.Module:
    """The built-in digits task's model: 64-256-10 with ReLU."""
    return mlp((64, 256, 10))


def train(seed: int, s: float, steps: int, lr: float = 0.05) -> nn.Module:
    task = load_task("digits")
    torch.manual_seed(seed)
    model = digits_mlp()
    structure = gaugefix.discover(model, task.x[:2])
    signs = torch.randn(structure.num_generators, generator=torch.Generator().manual_seed(seed))
    gaugefix.apply_gauge_(model, structure, s * signs.sign().to(torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model(task.x), task.y).backward()
        opt.step()
    return model


def quantize_int8(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-tensor symmetric int8 fake quantization of the weight matrices (``dim >= 2``), in
    float64: the dequantized ``q * d`` exactly, with no float32 rounding on top."""
    out = {}
    for name, t in tensors.items():
        if t.dim() < 2:
            out[name] = t
            continue
        t = t.double()
        step = t.abs().max() / 127
        out[name] = (t / step).round().clamp(-127, 127) * step
    return out


def evaluate(tensors: dict[str, Tensor]) -> tuple[Tensor, float]:
    """Test-split logits (float64) and accuracy of the digits MLP with ``tensors``."""
    task = load_task("digits")
    model = digits_mlp().double()
    model.load_state_dict({k: v.double() for k, v in tensors.items()})
    with torch.no_grad():
        logits = model(task.x_test.double())
    return logits, float((logits.argmax(-1) == task.y_test).double().mean())


def measure(tensors: dict[str, Tensor]) -> dict[str, float]:
    logits, accuracy = evaluate(tensors)
    q_logits, q_accuracy = evaluate(quantize_int8(tensors))
    error = float((q_logits - logits).norm() / logits.norm())
    return {"int8_output_error": error, "accuracy": accuracy, "int8_accuracy": q_accuracy}


def run(seeds: int, steps: int, out: Path) -> list[dict]:
    rows = []
    for s in (0.0, 1.0):
        for seed in range(seeds):
            trained = out / f"trained-s{s:g}-seed{seed}.safetensors"
            balanced = out / f"balanced-s{s:g}-seed{seed}.safetensors"
            model = train(seed, s, steps)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(trained))
            app(
                ["balance", "--model", f"{Path(__file__).stem}:digits_mlp", "--weights",
                 str(trained), "--out", str(balanced), "--input-shape", "1,64"],
                standalone_mode=False,
            )  # fmt: skip
            before, after = load_file(trained), load_file(balanced)
            float_change = float(
                (evaluate(after)[0] - evaluate(before)[0]).abs().max()
                / evaluate(before)[0].abs().max()
            )
            rows.append(
                {
                    "s": s,
                    "seed": seed,
                    "trained": measure(before),
                    "balanced": measure(after),
                    "balanced_float32_output_change": float_change,
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=None, help="keep the weight files here")
    args = p.parse_args()
    torch.set_num_threads(1)  # the numbers do not depend on the machine's core count
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        rows = run(args.seeds, args.steps, out)
    header = ["s", "seed", "int8 logit error: trained", "balanced", "change"]
    header += ["int8 accuracy: trained", "balanced"]
    print("\n| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t, b = r["trained"], r["balanced"]
        change = b["int8_output_error"] / t["int8_output_error"] - 1
        print(
            f"| {r['s']:g} | {r['seed']} | {t['int8_output_error']:.5f} | "
            f"{b['int8_output_error']:.5f} | {change:+.1%} | {t['int8_accuracy']:.4f} | "
            f"{b['int8_accuracy']:.4f} |"
        )
    medians = {}
    for s in (0.0, 1.0):
        for kind in ("trained", "balanced"):
            for key in ("int8_output_error", "accuracy", "int8_accuracy"):
                values = [r[kind][key] for r in rows if r["s"] == s]
                medians[f"s={s:g}/{kind}/{key}"] = statistics.median(values)
    for key, value in medians.items():
        print(f"median {key}: {value:.5f}")
    print(json.dumps({"rows": rows, "medians": medians}))


if __name__ == "__main__":
    main()
