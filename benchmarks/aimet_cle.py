"""AIMET's cross-layer equalization, run by AIMET's own interpreter (see
``benchmarks.quantization.AIMET_PYTHON``): ``python aimet_cle.py MODEL OUT`` loads
``{"model", "example"}`` from MODEL (saved whole, so the model's class must import here),
equalizes the model in place with ``equalize_model`` and saves its state dict to OUT."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # the saved model's classes


def main(source: str, target: str) -> None:
    from aimet_torch.cross_layer_equalization import equalize_model

    saved = torch.load(source, weights_only=False)
    equalize_model(saved["model"], dummy_input=saved["example"])
    torch.save(saved["model"].state_dict(), target)


if __name__ == "__main__":
    main(*sys.argv[1:])
