"""Item 5: ``discover`` against 20 forward passes at batch 1, on a ResNet-50-sized network
(224x224), on a GPT-2-small-sized language model (Hugging Face ``GPT2LMHeadModel`` with the
default GPT-2 config, 124M parameters, random weights: nothing is downloaded; sequence 64) and on
a tiny Mixtral mixture of experts (Hugging Face ``MixtralForCausalLM``: 2 layers, width 64, 4
experts top-2, its default grouped experts; sequence 64)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import gaugefix
from benchmarks.common import paired, ratio, summary
from benchmarks.models import ResNet50

FORWARDS = 20


def _gpt2(tiny: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4) if tiny else GPT2Config()
    return GPT2LMHeadModel(config)


def _mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=100,
        tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return MixtralForCausalLM(config)


MIXTRAL = (
    "tiny Mixtral (Hugging Face MixtralForCausalLM, 2 layers, width 64, 4 experts top-2), "
    "sequence 64",
    _mixtral,
    lambda: torch.randint(0, 100, (1, 64)),
)


def cases(tiny: bool) -> list[tuple[str, Callable[[], nn.Module], Callable[[], Tensor], int]]:
    """(name, model factory, example input, timed pairs)."""
    if tiny:
        return [
            (
                "ResNet-50 layout (tiny)",
                lambda: ResNet50((1, 1), 8, 10),
                lambda: torch.randn(1, 3, 32, 32),
                2,
            ),
            ("GPT-2 (tiny)", lambda: _gpt2(True), lambda: torch.randint(0, 50257, (1, 16)), 2),
            (*MIXTRAL, 2),
        ]
    return [
        (
            "ResNet-50 layout (bottleneck [3, 4, 6, 3], widths 64..2048), 224x224",
            ResNet50,
            lambda: torch.randn(1, 3, 224, 224),
            5,
        ),
        (
            "GPT-2 small (Hugging Face GPT2LMHeadModel, default config), sequence 64",
            lambda: _gpt2(False),
            lambda: torch.randint(0, 50257, (1, 64)),
            5,
        ),
        (*MIXTRAL, 5),
    ]


def _timed(model: nn.Module, x: Tensor, pairs: int) -> tuple[dict, gaugefix.GaugeStructure]:
    found: list[gaugefix.GaugeStructure] = []

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(FORWARDS):
                model(x)

    times = paired(
        {"discover": lambda: found.append(gaugefix.discover(model, x)), "forwards": forwards},
        pairs,
        warmup=1,
    )
    return times, found[-1]


def run(tiny: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    rows = []
    for name, make, example, pairs in cases(tiny):
        torch.manual_seed(0)
        model, x = make().eval(), example()
        times, structure = _timed(model, x, pairs)
        row = {
            "model": name,
            "params": sum(p.numel() for p in model.parameters()),
            "input": list(x.shape),
            "generators": structure.num_generators,
            "kinds": structure.kind_counts(),
            "pairs": pairs,
            "discover": summary(times["discover"]),
            "forwards_x20": summary(times["forwards"]),
            "ratio": ratio(times["discover"], times["forwards"]),
        }
        log(
            f"  {name}: discover {row['discover']['median_s']:.2f} s, {FORWARDS} forwards "
            f"{row['forwards_x20']['median_s']:.2f} s: ratio {row['ratio']:.2f} "
            f"({structure.num_generators} generators)"
        )
        rows.append(row)
    return rows
