"""Third audit of the training integrations: a corrupted checkpoint nested deeper than Python
can parse or print (before: a raw ``RecursionError``) is one ``ValueError`` line, nothing
restored, in the Hugging Face callback's saved structure, ``GaugeFixing.load_state_dict`` and
the Lightning callback's restored hook states."""

from __future__ import annotations

import base64
import copy
import warnings
import zlib

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import GaugeFixing, zoo
from test_integrations_audit2 import GAUGES, Tokens, gpt2, hf, hooked  # noqa: F401 (fixture)

DT = torch.float64
DEPTH = 100_000  # levels of nesting: far beyond the interpreter's recursion limit
STATE = {"steps": 2, "skipped": 0, "since": 1, "lr_sums": [0.1]}


def nested(depth: int = DEPTH) -> list:
    """``[[[...[]...]]]``, ``depth`` lists deep."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def encoded(json_text: bytes) -> str:
    """``json_text`` as the callback's checkpoint entry stores a structure (zlib, base64)."""
    return base64.b64encode(zlib.compress(json_text)).decode("ascii")


DEEP_JSON = {
    "array": b"[" * DEPTH + b"]" * DEPTH,
    "object": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
}


@pytest.mark.parametrize("kind", list(DEEP_JSON))
def test_decode_structure_of_deep_json_is_one_value_error(kind):
    """Before: ``RecursionError: maximum recursion depth exceeded while decoding a JSON
    array`` (or object)."""
    pytest.importorskip("transformers")
    from gaugefix.integrations.transformers import decode_structure

    with pytest.raises(ValueError, match="nested too deeply") as refused:
        decode_structure(encoded(DEEP_JSON[kind]))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("kind", list(DEEP_JSON))
def test_hf_checkpoint_with_a_deep_structure_is_one_value_error(hf, tmp_path, kind):  # noqa: F811
    """A ``trainer_state.json`` whose ``gaugefix`` structure decodes to deeply nested JSON:
    before, a raw ``RecursionError`` when training starts; now the callback's one-line
    ``ValueError``, no discovery hook on the model, nothing attached or restored."""
    from gaugefix.integrations.transformers import GaugeFixingCallback

    model, _ = gpt2(hf)
    args = hf.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    trainer = hf.Trainer(model, args, train_dataset=Tokens())
    callback = GaugeFixingCallback(trainer, **GAUGES["exact-1"])
    trainer.add_callback(callback)
    saved = {"structure": encoded(DEEP_JSON[kind]), "started": True, "hook": dict(STATE)}
    trainer.state.stateful_callbacks["gaugefix"] = saved
    with pytest.raises(ValueError, match="checkpoint's gauge-fixing state") as refused:
        callback.on_train_begin(args, trainer.state, trainer.control)
    assert "\n" not in str(refused.value)
    assert callback.structure is None and not callback.started and callback._carry is None
    assert not model._forward_pre_hooks


def hook_on_mlp() -> tuple[nn.Module, GaugeFixing]:
    torch.manual_seed(0)
    model = zoo.mlp((4, 6, 5, 1)).to(DT)
    structure = gaugefix.discover(model, torch.zeros(2, 4, dtype=DT))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, GaugeFixing(opt, model, structure, 1.0, every=3, balance_at_start=False)


@pytest.mark.parametrize("field", ["steps", "skipped", "since", "lr_sums"])
def test_hook_state_with_a_deep_value_is_one_value_error(field):
    """``GaugeFixing.load_state_dict`` of a state with a deeply nested count (or sum): before, a
    ``RecursionError`` while the error message printed the value; now one line that shows its
    first levels, the hook's state as before."""
    _, hook = hook_on_mlp()
    before = hook.state_dict()
    state = {**STATE, field: [nested()] if field == "lr_sums" else nested()}
    with pytest.raises(ValueError, match=f"GaugeFixing state's {field} must be") as refused:
        hook.load_state_dict(state)
    message = str(refused.value)
    assert "\n" not in message and message.endswith("[[[[[[[...]]]]]]]")
    assert hook.state_dict() == before
    hook.remove()


def test_lightning_restored_deep_hook_state_is_one_value_error(tmp_path):
    """A Lightning checkpoint's callback state whose hook state holds a deeply nested count:
    before, a ``RecursionError`` when training started; now a one-line ``ValueError``, no hook
    left attached, the model as it was (not balanced, not trained)."""
    pytest.importorskip("lightning.pytorch")
    from gaugefix.integrations.lightning import GaugeFixingCallback
    from test_lightning import Regressor, fit

    torch.manual_seed(0)
    module = Regressor()
    before = copy.deepcopy(module.state_dict())
    callback = GaugeFixingCallback(1.0, every=3)
    callback.load_state_dict({"hooks": [{**STATE, "since": nested()}]})
    with warnings.catch_warnings(), pytest.raises(ValueError, match="since must be") as refused:
        warnings.simplefilter("ignore")
        fit(module, callback, tmp_path)
    assert "\n" not in str(refused.value)
    assert callback.hooks == [] and not hooked(module.optimizers().optimizer)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
