"""The ``gaugefix`` command."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from inspect import signature
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from torch import nn

import gaugefix
from gaugefix.checkpoint import (
    INDEX_SUFFIXES,
    SHARD_SUFFIXES,
    CheckpointBalance,
    CheckpointError,
    StateDictFile,
    balance_state_dict,
    check_output,
    read_state_dict,
    write_state_dict,
)
from gaugefix.errors import first_line
from gaugefix.experiments.analyses import beside_sweep
from gaugefix.experiments.engine import (
    METHODS,
    OPTIMIZERS,
    PER_LAYER_LR_OPTIMIZERS,
    STRENGTH_METHODS,
    RunConfig,
)
from gaugefix.experiments.plan import BISECTION_ROUNDS, QUICK_BISECTION_ROUNDS, reproduce_grids
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.runner import (
    TaskSpec,
    activations,
    estimated_seconds,
    run_bisected,
    spec_of_run,
)
from gaugefix.experiments.store import Store, StoreError
from gaugefix.experiments.tasks import BUILTIN, TaskError
from gaugefix.experiments.workers import WorkerDied, Workers, cores, local_workers
from gaugefix.files import OutputError, missing_directories, output_target, write_text
from gaugefix.precision import float_outputs
from gaugefix.report import STORE_NAME, check_outputs, headline_table, render
from gaugefix.zoo import EXAMPLES

__all__ = ["app", "main"]

app = typer.Typer(
    help="Scale symmetry of positively homogeneous networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _parse_shape(text: str, option: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise _fail(f"{option} must be comma-separated integers, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise _fail(f"{option} must be positive integers, got {text!r}")
    return shape


InputShape = Annotated[str | None, typer.Option(help="example input shape, e.g. 1,3,32,32")]
InputIds = Annotated[
    str | None, typer.Option(help="example token ids of this shape, e.g. 1,64 (with --vocab)")
]
Vocab = Annotated[int | None, typer.Option(min=1, help="vocabulary size for --input-ids")]
AllowValueDependent = Annotated[
    bool,
    typer.Option(
        "--allow-value-dependent",
        help="accept a forward whose control flow reads its input or weights (a mixture's "
        "eager experts loop reads its routing): the structure is found on the path the "
        "example input takes and is exact only for inputs that take it; balance still checks "
        "the outputs, on the example input and on a second input of other sizes",
    ),
]
CACHE_OBJECTS_SINCE = 5  # the transformers major version that returns no cache as tuples
SHOWN_NAMES = 3  # the weights a summary line names; it counts the rest


def _example_input(
    input_shape: str | None,
    input_ids: str | None,
    vocab: int | None,
    default_shape: tuple[int, ...] | None,
) -> torch.Tensor:
    """The example input, drawn from a fixed seed: standard normal floats of ``--input-shape``
    (or the built-in example's shape), or token ids uniform in ``[0, --vocab)`` (int64) of
    ``--input-ids``' shape."""
    if input_shape is not None and input_ids is not None:
        raise _fail("give at most one of --input-shape and --input-ids")
    if (input_ids is None) != (vocab is None):
        raise _fail("--input-ids and --vocab go together")
    if input_ids is not None:
        shape = _parse_shape(input_ids, "--input-ids")
    elif input_shape is None and default_shape is None:
        raise _fail(
            "--input-shape is required for a model that is not a built-in example "
            "(or --input-ids with --vocab for token inputs)"
        )
    else:
        shape = _parse_shape(input_shape, "--input-shape") if input_shape else default_shape
    try:
        return _drawn(shape, vocab)
    except ValueError as err:
        raise _fail(f"cannot make an example input of shape {shape}: {err}") from None


def _drawn(shape: tuple[int, ...], vocab: int | None = None, seed: int = 0) -> torch.Tensor:
    """Normal floats of ``shape``, or token ids below ``vocab``, from the fixed ``seed``;
    ``ValueError`` with torch's reason in one line when they cannot be made (a shape or
    vocabulary too large for torch, or for the memory)."""
    generator = torch.Generator().manual_seed(seed)
    try:
        if vocab is not None:
            return torch.randint(vocab, shape, generator=generator)
        return torch.randn(shape, generator=generator)
    except (RuntimeError, OverflowError, TypeError, ValueError, MemoryError) as err:
        raise ValueError(first_line(err)) from None


# The second input ``balance`` checks the written weights on: drawn from this seed, with one
# more sample than the example and, for token ids, this many more tokens.
CHECK_SEED = 1
CHECK_LONGER = 3
CHECKED_ON_EXAMPLE_ONLY = "output change checked on the example input only"
STRUCTURE_UNCHECKED = "structure checked on no input of other sizes"  # inspect's words for it
BLIND = "they cannot show a change"  # of outputs that are all zero or not floating


def _second_input(
    model: nn.Module, x: torch.Tensor, vocab: int | None
) -> tuple[list[torch.Tensor], str | None]:
    """The input of other sizes than the example ``x`` that ``balance`` checks the written
    weights on (at most one), drawn as ``x`` was from :data:`CHECK_SEED`, and a line to print
    when it is not the first choice. The first choice is ``x``'s shape with dim 0 (the batch)
    one larger and, for token ids of two or more dims, the last (the length)
    :data:`CHECK_LONGER` larger; then the batch change alone, for a model of fixed length, and
    the length change alone, for one of fixed batch; none, for a model whose copy runs (in eval
    mode, its own dtype) on none of them (:func:`_candidate`: a shape passed over), or not on
    ``x``."""
    batch = (x.shape[0] + 1, *x.shape[1:])
    shapes = [batch]
    if not x.is_floating_point() and x.dim() >= 2:
        longer = (*x.shape[:-1], x.shape[-1] + CHECK_LONGER)
        shapes = [(*batch[:-1], batch[-1] + CHECK_LONGER), batch, longer]
    try:  # probed on a copy: a forward may change the model (weight_norm's weight, a cache)
        model = copy.deepcopy(model).eval()
    except Exception as err:  # whatever a module's __deepcopy__ raises (balancing copies too)
        return [], f"{CHECKED_ON_EXAMPLE_ONLY}: the model cannot be copied ({first_line(err)})"
    failed = _failure(model, x)
    if failed is not None:
        return [], f"{CHECKED_ON_EXAMPLE_ONLY}: the model fails on it in its own dtype ({failed})"
    reasons: list[str] = []
    for shape in shapes:
        second, unusable = _candidate(model, shape, vocab)
        if unusable is None and reasons:
            kept = "length" if len(reasons) == 1 else "batch"
            return [second], f"the second input keeps the example's {kept}: {reasons[-1]}"
        if unusable is None:
            return [second], None
        reasons.append(unusable)
    return [], f"{CHECKED_ON_EXAMPLE_ONLY}: {reasons[-1]}"


def _candidate(
    model: nn.Module, shape: tuple[int, ...], vocab: int | None
) -> tuple[torch.Tensor | None, str | None]:
    """The second input of ``shape`` (drawn from :data:`CHECK_SEED`) and None; or None and why
    the written weights cannot be checked on it, in one line: it cannot be made (too large for
    the memory), ``model`` fails on it (in its own dtype), or the model's floating outputs on it
    are all zero or none (they cannot show a change of the function)."""
    try:
        second = _drawn(shape, vocab, CHECK_SEED)
    except ValueError as err:
        return None, f"an input of shape {shape} cannot be made ({err})"
    output, failed = _forward(model, second)
    if failed is not None:
        return None, f"the model fails on shape {shape} ({failed})"
    floats = float_outputs(output)
    if not floats:
        return None, f"the model's outputs on shape {shape} hold no floating tensor: {BLIND}"
    if not any(bool(t.any()) for t in floats):
        return None, f"the model's outputs on shape {shape} are all zero: {BLIND}"
    return second, None


def _in_model_dtype(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Floating ``x`` in the dtype of ``model``'s first floating parameter (a half-precision
    model gets half-precision inputs); token ids as they are."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return x.to(dtype) if x.is_floating_point() and dtype is not None else x


def _call_options(model: nn.Module) -> dict[str, bool]:
    """The keyword arguments of ``inspect``'s example call: ``use_cache=False`` for a model of
    transformers :data:`CACHE_OBJECTS_SINCE` or later whose forward takes it, else none. Such
    a model returns its key-value cache as a ``Cache`` object, which discovery does not search:
    without it the structure is the same, less the note on it. (Before, a cache of tuples is
    an output, which keeps the attention's generators out, as ``balance`` finds them.)"""
    transformers = sys.modules.get("transformers")
    if transformers is None or int(transformers.__version__.split(".")[0]) < CACHE_OBJECTS_SINCE:
        return {}
    takes = "use_cache" in signature(model.forward).parameters
    return {"use_cache": False} if isinstance(model, transformers.PreTrainedModel) and takes else {}


def _load_model(target: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """A built-in example by name, or ``package.module:factory`` (importable from the current
    directory too) called without arguments."""
    if target in EXAMPLES:
        factory, shape = EXAMPLES[target]
        return factory(), shape
    if ":" not in target:
        names = ", ".join(EXAMPLES)
        raise _fail(f"unknown model {target!r}: use one of {names} or PACKAGE.MODULE:FACTORY")
    module_name, attr = target.split(":", 1)
    if os.getcwd() not in sys.path:  # a module of the user's, as `python -c` would find it
        sys.path.insert(0, os.getcwd())
    try:  # a module that is not there, a relative or empty name, or one that fails to import
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as err:
        raise _fail(f"cannot load {target!r}: {first_line(err)}") from None
    try:
        model = factory()
    except Exception as err:
        raise _fail(
            f"calling {target!r} failed ({type(err).__name__}: {first_line(err)}); the factory "
            "must build the model without arguments"
        ) from None
    if not isinstance(model, nn.Module):
        raise _fail(f"{target!r} returned {type(model).__name__}, not an nn.Module")
    return model, None


MODEL_HELP = (
    f"a built-in example ({', '.join(EXAMPLES)}) or PACKAGE.MODULE:FACTORY, a function that "
    "builds the model without arguments"
)


@app.command()
def inspect(
    target: Annotated[str | None, typer.Argument(help=f"{MODEL_HELP} (or give --model)")] = None,
    model_option: Annotated[
        str | None,
        typer.Option("--model", help="the model, as the first argument (balance's spelling)"),
    ] = None,
    input_shape: InputShape = None,
    input_ids: InputIds = None,
    vocab: Vocab = None,
    save: Annotated[Path | None, typer.Option(help="write the structure as JSON here")] = None,
    scale_groups: Annotated[
        bool,
        typer.Option(
            "--scale-groups",
            help="print only the SmoothQuant/AWQ-style scale groups, as JSON (llm-compressor's "
            "mapping convention: smooth_layer, balance_layers)",
        ),
    ] = False,
    allow_value_dependent: AllowValueDependent = False,
) -> None:
    """Discover a model's gauge group and print the per-layer summary (or its scale groups),
    checked on a second input of other sizes (one more sample; for token ids, 3 more tokens):
    --save and --scale-groups write nothing when the structure moves the outputs there."""
    target = _one_model(target, model_option)
    made: list[Path] = []
    if save is not None:
        _check_output(save)
        made = _missing_directories(save)
    model, default_shape = _load_model(target)
    x = _in_model_dtype(model, _example_input(input_shape, input_ids, vocab, default_shape))
    model.eval()
    try:
        structure = gaugefix.discover(
            model, x, allow_value_dependent=allow_value_dependent, **_call_options(model)
        )
    except gaugefix.TracingError as err:
        raise _fail(_traced(err, model, x)) from None
    checked, refusal = _checked_elsewhere(model, structure, x, vocab)
    if refusal is not None and (save is not None or scale_groups):
        raise _fail(f"{refusal}; nothing written")
    if scale_groups:
        groups = [json.dumps(group) for group in structure.scale_groups()]
        typer.echo("[\n" + ",\n".join(groups) + "\n]" if groups else "[]")
    else:
        typer.echo(f"{target}: {sum(p.numel() for p in model.parameters())} parameters")
        typer.echo(structure.summary())
    if save is not None:
        with _interruptible(_interrupted(save)):  # what GaugeStructure.save writes
            write_text(save, json.dumps(structure.to_dict()))
        said = f"structure written to {save}{_made(made)}"
        typer.echo(said, err=scale_groups)  # stdout stays JSON
    for line in checked if refusal is None else [*checked, refusal]:
        typer.echo(line, err=True)  # stdout stays the summary, or JSON; after a write error: none


def _checked_elsewhere(
    model: nn.Module, structure: gaugefix.GaugeStructure, x: torch.Tensor, vocab: int | None
) -> tuple[list[str], str | None]:
    """What ``inspect`` says of ``structure`` (discovered on the example ``x``) on the second
    input of other sizes ``balance`` checks on (:func:`_second_input`), checked by
    :func:`gaugefix.verify` (a float64 copy before and after a random gauge): the lines to
    print (how the input was chosen, if not the first choice; that the structure holds, to
    verify's tolerance, or why it was not checked) and the line of a structure that moves the
    outputs there (None if it does not)."""
    checks, note = _second_input(model, x, vocab)
    if not checks:  # the note says why, in balance's words
        return [note.replace(CHECKED_ON_EXAMPLE_ONLY, STRUCTURE_UNCHECKED, 1)], None
    lines = [note] if note is not None else []
    shape = tuple(checks[0].shape)
    try:
        result = gaugefix.verify(model, structure, checks[0], **_call_options(model))
    except Exception as err:  # a VerificationError, or whatever the float64 forward raises
        why = f"{type(err).__name__}: {first_line(err)}"
        return [*lines, f"structure not checked on a second input of shape {shape} ({why})"], None
    if result.ok:  # the bound, not the rounding measured, which varies with the weights
        bound = f"a random gauge moves each output by at most {result.tolerance:.0e} of its max"
        return [*lines, f"structure holds on a second input of shape {shape}: {bound}"], None
    moved = int(result.broken.sum())
    return lines, (
        f"the structure does not hold on a second input of shape {shape}: {moved} of "
        f"{structure.num_generators} generators move the outputs there (relative change "
        f"{result.max_change:.3g}); give an example input of the sizes you use (with "
        f"--allow-value-dependent, taking the paths yours take), or keep the "
        f"others in Python: structure.restrict(~gaugefix.verify(model, structure, x).broken, "
        f"reason), x an input of your sizes"
    )


def _one_model(target: str | None, option: str | None) -> str:
    """``inspect``'s model: its argument or ``--model``, given once."""
    if (target is None) == (option is None):
        again = "once, " if target is not None else ""
        raise _fail(f"give the model {again}as the first argument or with --model")
    return target if target is not None else option


def _missing_directories(path: Path) -> list[Path]:
    """The directories of the file ``path`` (a symbolic link: the file it points to) that do
    not exist, which writing it makes; outermost first."""
    target = output_target(path) if path.is_symlink() else path
    return missing_directories(target.parent)[::-1]


def _made(made: list[Path]) -> str:
    """The end of a written file's line: the directories made for it, if any."""
    return f"; made {', '.join(map(str, made))}" if made else ""


@app.command(
    help="Balance saved weights (hard gauge fixing), the function unchanged: the minimal-norm "
    "point of their orbit, or with --objective the point gaugefix.equalize_ chooses."
)
def balance(
    model: Annotated[str, typer.Option(help="built-in example name or PACKAGE.MODULE:FACTORY")],
    weights: Annotated[
        Path,
        typer.Option(
            help="state dict: safetensors or a PyTorch file, or a sharded checkpoint's index "
            "(model.safetensors.index.json)"
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="balanced weights, in the same format and dtypes (for an index: the index, "
            "its shard files written beside it)"
        ),
    ],
    input_shape: InputShape = None,
    input_ids: InputIds = None,
    vocab: Vocab = None,
    objective: Annotated[
        str, typer.Option(help="the orbit point: norm (minimal norm), range or activation")
    ] = "norm",
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="activation: .npz whose array X is the calibration batch (default: "
            "the example input)"
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help=f"activation: SmoothQuant's exponent (default {gaugefix.equalize.DEFAULT_ALPHA})"
        ),
    ] = None,
    allow_value_dependent: AllowValueDependent = False,
) -> None:
    with _interruptible(_interrupted(out)):
        _check_output(out)
        made = _missing_directories(out)
        _check_objective(objective, calibration, alpha)
        net, default_shape = _load_model(model)
        x = _example_input(input_shape, input_ids, vocab, default_shape)
        batch = None
        if objective == "activation":
            batch = _calibration(calibration) if calibration is not None else x
        try:
            state = read_state_dict(weights)
            check_output(state, out)  # before any work: a shard beside out not out's own
            _check_suffix(state, weights, out)
            checks, note = _second_input(net, x, vocab)
            tensors, report = balance_state_dict(
                net, state.tensors, x, objective, batch, alpha, allow_value_dependent, checks=checks
            )
        except (CheckpointError, gaugefix.ShardingError, gaugefix.TracingError) as err:
            raise _fail(_traced(err, net, x)) from None
        _report_balance(model, objective, report, note)
        _write_balanced(dataclasses.replace(state, tensors=tensors), out, made)


def _said_format(state: StateDictFile, path: Path) -> str | None:
    """The format ``path``'s name says (a shard's suffix, or an index's for a sharded
    ``state``), or None."""
    suffixes = INDEX_SUFFIXES if state.index is not None else SHARD_SUFFIXES
    return next((f for s, f in suffixes.items() if path.name.endswith(s)), None)


def _check_suffix(state: StateDictFile, weights: Path, out: Path) -> None:
    """:class:`CheckpointError` when ``out``'s name says safetensors and ``state`` is a PyTorch
    file, written as one (every safetensors loader fails on it), unless ``weights``' name says
    safetensors too (names the user keeps as they are). A ``.bin`` or ``.pt`` name is taken
    for either format."""
    said = _said_format(state, out)
    if said != "safetensors" or said in (state.format, _said_format(state, weights)):
        return
    suffixes = INDEX_SUFFIXES if state.index is not None else SHARD_SUFFIXES
    wanted = " or ".join(s for s, f in suffixes.items() if f == state.format)
    raise CheckpointError(
        f"cannot write {out}: its name says {said}, but the weights read are {state.format} "
        f"and are written in the same format; name it {wanted}"
    )


def _write_balanced(state: StateDictFile, out: Path, made: list[Path]) -> None:
    """Write the balanced ``state`` to ``out`` and say so, naming the directories ``made`` for
    it; a :class:`CheckpointError` (an output file that appeared since :func:`check_output`:
    nothing written) in one line."""
    try:
        write_state_dict(state, out)
    except CheckpointError as err:
        raise _fail(str(err)) from None
    dtypes = ", ".join(
        sorted({str(t.dtype).removeprefix("torch.") for t in state.tensors.values()})
    )
    shards = f" and its {len(state.index.names)} shards" if state.index else ""
    typer.echo(f"balanced weights written to {out}{shards} ({state.format}, {dtypes}){_made(made)}")


def _traced(err: Exception, model: nn.Module, x: torch.Tensor) -> str:
    """The message of ``err``, naming the command's option where it names ``discover``'s, or
    the example input's option where ``model`` fails on ``x`` without gaugefix too."""
    if isinstance(err, gaugefix.ValueDependentError):
        return f"{err} (--allow-value-dependent)"
    if isinstance(err, gaugefix.TracingError) and not _runs(model, x):
        option = "--input-shape" if x.is_floating_point() else "--input-ids and --vocab"
        if x.is_floating_point() and _runs(model, torch.zeros(x.shape, dtype=torch.long)):
            option = f"--input-ids {','.join(map(str, x.shape))} and --vocab (it takes token ids)"
        return (
            f"{err}; the model fails on the example input of shape {tuple(x.shape)} without "
            f"gaugefix too: give the input it takes with {option}"
        )
    return str(err)


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` (its weights as they are) runs on ``x`` in its own dtype."""
    return _failure(model, x) is None


def _failure(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``model`` (its weights as they are) fails on ``x`` in its own dtype, in one line
    (the exception's type and first line); None when it runs."""
    return _forward(model, x)[1]


def _forward(model: nn.Module, x: torch.Tensor) -> tuple[object, str | None]:
    """``model``'s output on ``x`` in its own dtype (its weights as they are, no gradients) and
    None; or None and why it fails, in one line (the exception's type and first line)."""
    try:
        with torch.no_grad():
            return model(_in_model_dtype(model, x)), None
    except Exception as err:  # whatever the model's own forward raises
        return None, f"{type(err).__name__}: {first_line(err)}"


def _interrupted(out: Path) -> str:
    """The line of a command interrupted (Ctrl-C, SIGTERM) while it may be writing ``out``."""
    return f"interrupted: {out} is as it was (or complete, had its write ended)"


def _check_output(path: Path) -> None:
    """Refuse, before any work, an output path that is a directory, device, FIFO or socket."""
    try:
        output_target(path)
    except OutputError as err:
        raise _fail(str(err)) from None


def _check_objective(objective: str, calibration: Path | None, alpha: float | None) -> None:
    """Refuse an unknown ``--objective``, and ``--calibration`` or ``--alpha`` (which must be in
    ``[0, 1]``) given with an objective other than ``activation``."""
    if objective not in gaugefix.equalize.OBJECTIVES:
        raise _fail(f"unknown --objective {objective!r}; choose from norm, range, activation")
    if alpha is not None and not 0 <= alpha <= 1:
        raise _fail(f"alpha must be a number in [0, 1], got {alpha!r}")
    for option, value in (("--calibration", calibration), ("--alpha", alpha)):
        if value is not None and objective != "activation":
            raise _fail(f"{option} is used only with --objective activation")


def _report_balance(
    model: str, objective: str, report: CheckpointBalance, note: str | None = None
) -> None:
    """Print what balancing did to the weights, and on the second input of other sizes (and
    ``note``, how it was chosen); exit with one line when the outputs changed more than the
    tolerance on either input (nothing is written then)."""
    before, after = report.before, report.after
    typer.echo(f"{model}: {report.num_generators} generators")
    if objective != "norm":
        typer.echo(_equalized_line(objective, report.result))
        uncalibrated = _uncalibrated_line(report.result.uncalibrated)
        if uncalibrated is not None:
            typer.echo(uncalibrated)
    typer.echo(
        f"imbalance max |mu_n|/S_n: {before['mu_rel_max']:.3g} -> {after['mu_rel_max']:.3g}; "
        f"RMS log-ratio: {before['log_ratio_rms']:.3g} -> {after['log_ratio_rms']:.3g}; "
        f"||theta||^2: {before['norm_sq']:.6g} -> {after['norm_sq']:.6g}"
    )
    typer.echo(
        f"largest output change on the example input: {report.output_change:.3g} "
        f"(max |output| {report.output_scale:.3g}; float64 before rounding: "
        f"{report.exact_change:.3g}); relative to each output's max |output|: "
        f"{report.output_relative:.3g} (float64: {report.exact_relative:.3g})"
    )
    if report.check_shapes:  # the command checks one
        typer.echo(
            f"largest output change on a second input of shape {report.check_shapes[0]}, "
            f"relative to each output's max |output|: {report.check_relative:.3g} (float64: "
            f"{report.check_exact_relative:.3g})"
        )
    if note is not None:
        typer.echo(note)
    refusal = _refusal(report)
    if refusal is not None:
        raise _fail(refusal)


def _refusal(report: CheckpointBalance) -> str | None:
    """Why the balanced weights are not written, in one line: the float64 move or the rounded
    weights change an output beyond its tolerance on the example input, or on the second
    input (then the structure found at the example's sizes does not hold at others); None when
    they are within tolerance (a NaN change is beyond it)."""
    f64, tolerance = (
        report.relative_tolerance(torch.float64),
        report.relative_tolerance(report.dtype),
    )
    second = f"on the second input of shape {report.check_shapes[0]}" if report.check_shapes else ""
    if not report.exact_relative <= f64:
        return (
            f"balancing in float64 changed the outputs by {_worst(report.per_output_exact)}, more "
            f"than {f64:.2g}: the discovered symmetry does not hold for this model; nothing written"
        )
    if not report.check_exact_relative <= f64:
        return (
            f"balancing in float64 changed the outputs {second} by "
            f"{_worst(report.per_check_exact[0])}, more than {f64:.2g} (on the example input: "
            f"{report.exact_relative:.2g}): the symmetry discovered at the example's sizes does "
            "not hold at others (the forward reads its input's sizes where no trace sees it, or "
            "takes another path, with --allow-value-dependent); nothing written"
        )
    if not report.output_relative <= tolerance:
        changed = f"the outputs by {_worst(report.per_output_change)}"
    elif not report.check_relative <= tolerance:
        changed = f"the outputs {second} by {_worst(report.per_check_change[0])}"
    else:
        return None
    return (
        f"the balanced weights in {report.dtype} change {changed}, more than {tolerance:.2g}; "
        "nothing written"
    )


def _worst(changes: tuple[float, ...]) -> str:
    """The largest relative change of an output, and which output it is."""
    index, change = CheckpointBalance.worst(changes)
    return f"{change:.3g} x max |output| (of output {index}, each against its own)"


def _equalized_line(objective: str, done: gaugefix.EqualizeResult) -> str:
    return (
        f"{objective}: residual max |delta_n| {done.objective_before:.3g} -> "
        f"{done.objective_after:.3g} in {done.iterations} iterations; "
        f"{len(done.dead_generators)} generators it does not see left in place"
    )


def _uncalibrated_line(names: tuple[str, ...]) -> str | None:
    """The line naming the weights the activation objective's calibration pass cannot follow
    (their channels balanced as ``"range"`` balances them): the first :data:`SHOWN_NAMES`,
    and how many more; None when there are none."""
    if not names:
        return None
    shown = ", ".join(names[:SHOWN_NAMES])
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    one = len(names) == 1
    return (
        f"activation: {len(names)} weight{'' if one else 's'} the calibration pass cannot "
        f"follow, {'its' if one else 'their'} channels balanced as range does: {shown}{more}"
    )


def _calibration(path: Path) -> torch.Tensor:
    """The array ``X`` of an ``.npz`` file as a tensor in native byte order (token ids stay
    integers)."""
    arrays = _npz(path)
    try:  # any failure: a truncated or damaged file, or an array torch cannot hold
        with arrays:
            names = arrays.files
            x = arrays["X"] if "X" in names else None
        if x is not None:
            x = torch.from_numpy(x.astype(x.dtype.newbyteorder("=")))
    except Exception as err:
        raise _fail(f"cannot read {path} as .npz: {first_line(err)}") from None
    if x is None:
        raise _fail(f"{path} has no array 'X' (found: {', '.join(names)})")
    return x


def _npz(path: Path) -> np.lib.npyio.NpzFile:
    """``path`` opened as an ``.npz`` file; one line for a path that is not a regular file (a
    FIFO would block the read) and for a ``.npy`` file (one array)."""
    if path.exists() and not path.is_file():
        raise _fail(
            f"{path} is not a regular file (a directory, device or FIFO): --calibration takes "
            "an .npz file"
        )
    try:  # a missing file, or one numpy cannot read
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:
        raise _fail(f"cannot read {path} as .npz: {first_line(err)}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise _fail(
            f"{path} is a .npy file (one array), not an .npz: save the calibration batch with "
            "numpy.savez(FILE, X=batch)"
        )
    return loaded


@app.callback()
def main() -> None:
    """gaugefix: find, fix and study the scale symmetry of PyTorch networks."""


def _floats(text: str, option: str, positive: bool = False, nonneg: bool = False) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _fail(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) for v in values):
        raise _fail(f"{option} must be finite numbers, got {text!r}")
    if positive and any(v <= 0 for v in values):
        raise _fail(f"{option} must be > 0, got {text!r}")
    if nonneg and any(v < 0 for v in values):
        raise _fail(f"{option} must be >= 0, got {text!r}")
    return values


def _names(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [v for v in values if v not in allowed]
    if not values or unknown:
        raise _fail(
            f"unknown {option} {', '.join(unknown) or text!r}; choose from {', '.join(allowed)}"
        )
    return values


JOBS_HELP = (
    f"worker processes of one thread each (default: one per core, {cores()} here; with "
    "--executor ray: the CPUs of a local Ray instance)"
)
ExecutorName = Annotated[str, typer.Option(help="local (this machine) or ray")]
RayAddress = Annotated[
    str | None,
    typer.Option(
        help="with --executor ray: the cluster to join (auto: the one `ray start` made here); "
        "without it a local Ray instance with --jobs CPUs"
    ),
]


@contextmanager
def _executor(name: str, address: str | None, jobs: int) -> Iterator[Workers | None]:
    """The workers of ``--executor`` (None: the local ones), connected for the block."""
    if name not in ("local", "ray"):
        raise _fail(f"unknown executor {name!r}; choose from local, ray")
    if name == "local":
        if address is not None:
            raise _fail("--ray-address needs --executor ray")
        yield None
        return
    from gaugefix.experiments.ray_executor import ClusterError, ray_executor

    try:
        with ray_executor(address, jobs) as workers:
            yield workers
    except ClusterError as err:
        raise _fail(str(err)) from None


# The largest steps, seeds and batch size: SQLite's largest INTEGER (a run's are stored as one).
STORED_INT_MAX = 2**63 - 1
LARGE_RUNS = 100_000  # a grid of more runs needs --allow-large
LARGE_SECONDS = 12 * 3600  # and so does one estimated to take longer


_INTERRUPTED = "interrupted: finished runs are stored; run the same command to resume"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _interruptible(message: str = _INTERRUPTED) -> Iterator[None]:
    """Ctrl-C and SIGTERM end the block with one line (``message``) and exit status 130, where
    they can be handled: a store's transaction rolls back, the workers end, the claims are
    released, an output file being written is removed; a store error or an output that cannot
    be written, or a task error while it trains (a data file changed under a worker), ends it
    with one line and exit status 2."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    except (StoreError, OutputError, WorkerDied, TaskError) as err:
        raise _fail(str(err)) from None
    except KeyboardInterrupt:
        typer.echo(message, err=True)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(
    out: Path,
    configs: list[RunConfig],
    spec_of: Callable[[RunConfig], TaskSpec],
    jobs: int | None,
    executor: str,
    ray_address: str | None,
    rounds: int = 0,
) -> tuple[Store, int]:
    """Train ``configs`` into OUT's store on the workers of ``--executor`` (``--jobs``, default
    one per core), then ``rounds`` rounds of bisection of the stable edges; the store and the
    number of runs written."""
    jobs = jobs or cores()
    with _executor(executor, ray_address, jobs) as workers:
        store = _store(out)
        return store, run_bisected(store, configs, spec_of, rounds, jobs, workers=workers)


def _made_by(store: Store, command: str) -> None:
    """Record that ``command`` wrote runs to ``store`` (the report's title names them)."""
    made_by = set(store.analysis("meta/made-by") or []) | {command}
    store.put_analysis("meta/made-by", sorted(made_by), 0.0, replace=True)


def _render(out: Path, quick: bool | None = None) -> dict:
    """:func:`gaugefix.report.render`, with progress; a store the summary refuses (runs of
    two dtypes in one cell, say) ends the command with one line."""
    with Progress(1, unit="report") as progress:
        progress.update(label=f"writing {out / 'report.md'}, its figures and summary.json")
        try:
            summary = render(out, quick)
        except ValueError as err:
            raise _fail(str(err)) from None
        progress.update(done=1)
    return summary


def _store(out: Path) -> Store:
    """OUT's store (created when missing); one line when it cannot be used, or when the report
    could never be written there (refused before any run is trained for it)."""
    try:
        if out.is_dir():
            check_outputs(out)
        return Store(out / STORE_NAME)
    except (StoreError, OutputError) as err:
        raise _fail(str(err)) from None


@app.command(
    help="Run the paper's (arXiv 2602.14729) controlled experiments into OUT: store, "
    f"figures, report, summary. Tasks {', '.join(g.task for g in reproduce_grids(False))} "
    "(--quick: "
    f"{', '.join(g.task for g in reproduce_grids(True))}); methods {', '.join(METHODS)}; "
    f"optimizer gd (full batch), and {', '.join(o for o in OPTIMIZERS if o != 'gd')} "
    "(mini-batch) for the scale-drift experiment."
)
def reproduce(
    quick: Annotated[
        bool, typer.Option("--quick", help="smaller grids, about 90 seconds on two cores")
    ] = False,
    out: Annotated[Path, typer.Option(help="results directory")] = Path("gaugefix-results"),
    jobs: Annotated[int | None, typer.Option(min=1, help=JOBS_HELP)] = None,
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
) -> None:
    start = time.perf_counter()
    configs = [c for g in reproduce_grids(quick) for c in g.configs(TaskSpec(g.task))]
    with _interruptible():
        rounds = QUICK_BISECTION_ROUNDS if quick else BISECTION_ROUNDS
        jobs = jobs or cores()
        with _executor(executor, ray_address, jobs) as cluster, ExitStack() as stack:
            # one set of workers, started once, for the grid, every bisection round and the
            # analyses: those that read no run are submitted before the grid, the others after
            # the last round
            workers = cluster or stack.enter_context(local_workers(jobs))
            store = _store(out)
            beside_sweep(
                store,
                quick,
                lambda: run_bisected(
                    store,
                    configs,
                    spec_of_run,
                    rounds,
                    jobs,
                    workers=workers,
                    choose_strengths=True,
                ),
                workers,
            )
        store.put_analysis("meta/quick", {"quick": quick}, 0.0, replace=True)
        _made_by(store, f"reproduction ({'quick' if quick else 'full'})")
        summary = _render(out, quick)
    typer.echo(headline_table(summary))
    typer.echo(
        f"\n{summary['runs']} runs in {out}; report: {out / 'report.md'} "
        f"({time.perf_counter() - start:.0f} s)"
    )


Methods = Annotated[str, typer.Option(help=f"comma-separated, some of {', '.join(METHODS)}")]
Strengths = Annotated[
    str, typer.Option(help=f"comma-separated strengths of {', '.join(STRENGTH_METHODS)}")
]
InitImbalances = Annotated[
    str,
    typer.Option(
        help="comma-separated initial imbalances s (the initialisation moved by h = s z along "
        "its orbit, z random signs)"
    ),
]
OptimizerNames = Annotated[
    str, typer.Option(help=f"comma-separated, some of {', '.join(OPTIMIZERS)} (gd: full batch)")
]


@app.command()
def sweep(
    task: Annotated[
        str | None, typer.Option(help=f"a built-in task: {', '.join(BUILTIN)} (or use --data)")
    ] = None,
    data: Annotated[Path | None, typer.Option(help=".npz with X, y[, X_test, y_test]")] = None,
    task_type: Annotated[
        str | None, typer.Option(help="with --data: regression (default) or classification")
    ] = None,
    hidden: Annotated[
        str | None, typer.Option(help="with --data: hidden widths, e.g. 128,128 (default 128)")
    ] = None,
    method: Methods = "plain",
    strength: Strengths = "1.0",
    lr: Annotated[str, typer.Option(help="comma-separated learning rates")] = "0.1",
    init_imbalance: InitImbalances = "0.0",
    optimizer: OptimizerNames = "gd",
    batch_size: Annotated[int, typer.Option(min=0, help="mini-batch size (0: full)")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="training steps per run")] = 200,
    seeds: Annotated[int, typer.Option(min=1, help="seeds 0..N-1")] = 1,
    out: Annotated[Path, typer.Option(help="results directory")] = Path("gaugefix-results"),
    jobs: Annotated[int | None, typer.Option(min=1, help=JOBS_HELP)] = None,
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    allow_large: Annotated[
        bool,
        typer.Option(
            "--allow-large",
            help=f"run a grid of more than {LARGE_RUNS:,} runs or estimated to take more than "
            f"{LARGE_SECONDS // 3600} h (refused without it)",
        ),
    ] = False,
) -> None:
    """Run one grid of training runs into OUT's store and re-render the report."""
    for option, value in (("--batch-size", batch_size), ("--steps", steps), ("--seeds", seeds)):
        if value > STORED_INT_MAX:
            raise _fail(f"'{option}' must be at most {STORED_INT_MAX} (the store's integers)")
    spec = _sweep_task(task, data, task_type, hidden)
    axes = _axes(method, strength, optimizer, lr, init_imbalance, seeds)
    example = RunConfig(spec.name, "plain", "gd", 1.0, 0.0, 0.0, 0, batch_size, steps, task_hash="")
    if not allow_large:
        _refuse_large(spec, example, math.prod(len(a) for a in axes), jobs or cores())
    hashes = {seed: spec.for_seed(seed).hash() for seed in axes[-1]}  # each seed's instance
    configs = [
        RunConfig(spec.name, m, o, rate, st, s, seed, batch_size, steps, task_hash=hashes[seed])
        for (m, st), o, rate, s, seed in itertools.product(*axes)
    ]
    with _interruptible():
        store, written = _train(
            out, configs, lambda c: spec.for_seed(c.seed), jobs, executor, ray_address
        )
        _made_by(store, "sweep")
        _render(out)
    typer.echo(f"{written} new runs written to {out / STORE_NAME}; report: {out / 'report.md'}")


def _axes(
    method: str, strength: str, optimizer: str, lr: str, init_imbalance: str, seeds: int
) -> tuple[Sequence, ...]:
    """The grid's axes, each without repeats: (method, strength) pairs (a method without a
    strength has one pair), optimizers, learning rates, initial imbalances, seeds."""
    methods = dict.fromkeys(
        (m, st if m in STRENGTH_METHODS else 0.0)
        for m in _names(method, "method", tuple(METHODS))
        for st in _floats(strength, "--strength", nonneg=True)
    )
    optimizers = list(dict.fromkeys(_names(optimizer, "optimizer", OPTIMIZERS)))
    undefined = [o for o in optimizers if o not in PER_LAYER_LR_OPTIMIZERS]
    if undefined and any(METHODS[m].per_layer_lr for m, _ in methods):
        raise _fail(
            f"per-layer-lr is defined for {', '.join(PER_LAYER_LR_OPTIMIZERS)}, not "
            f"{', '.join(undefined)}"
        )
    return (
        list(methods),
        optimizers,
        list(dict.fromkeys(_floats(lr, "--lr", positive=True))),
        list(dict.fromkeys(_floats(init_imbalance, "--init-imbalance"))),
        range(seeds),  # not a list: an absurd --seeds is refused before it is built
    )


def _sweep_task(
    task: str | None, data: Path | None, task_type: str | None, hidden: str | None
) -> TaskSpec:
    """The task of ``sweep``'s options, loaded once (so a bad data file fails here)."""
    if (task is None) == (data is None):
        raise _fail("give exactly one of --task and --data")
    if task is not None and (task_type is not None or hidden is not None):
        raise _fail("--task-type and --hidden apply to --data only (a built-in task fixes both)")
    widths = _parse_shape(hidden or "128", "--hidden")
    spec = TaskSpec(
        task or (data.stem if data else ""),
        str(data) if data else None,
        (task_type or "regression") if data else None,
        widths,
    )
    try:
        spec.hash()
        if data is not None:  # the widths given build a model that runs on the data
            activations(spec.load())
    except TaskError as err:
        raise _fail(str(err)) from None
    except RuntimeError as err:  # a model too large for the memory (--hidden)
        raise _fail(f"cannot run the model of task {spec.name!r}: {first_line(err)}") from None
    return spec


def _refuse_large(spec: TaskSpec, example: RunConfig, runs: int, workers: int) -> None:
    """Refuse, before anything runs, a grid of ``runs`` runs like ``example`` that is larger
    than :data:`LARGE_RUNS` or estimated to take longer than :data:`LARGE_SECONDS`."""
    seconds = estimated_seconds(spec.load(), example, runs, workers)
    if runs > LARGE_RUNS or seconds > LARGE_SECONDS:
        hours = f"{seconds / 3600:,.0f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
        raise _fail(
            f"the grid has {runs:,} run{'s' * (runs != 1)}, estimated to take about {hours} on "
            f"{workers} workers (more than {LARGE_RUNS:,} runs or {LARGE_SECONDS // 3600} h); pass "
            "--allow-large to run it"
        )


@app.command()
def report(out: Annotated[Path, typer.Argument(help="results directory")]) -> None:
    """Re-render report.md, the figures and summary.json from OUT's store."""
    if not (out / STORE_NAME).exists():
        raise _fail(
            f"no store at {out / STORE_NAME}: `gaugefix sweep --out {out}` or `gaugefix "
            f"reproduce --out {out}` makes one"
        )
    try:
        summary = _render(out)
    except (StoreError, OutputError) as err:
        raise _fail(str(err)) from None
    typer.echo(headline_table(summary))
