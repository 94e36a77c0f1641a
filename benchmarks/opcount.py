"""Item 8: what gauge fixing adds to a training step, counted rather than timed: the aten
operations dispatched (on a GPU, roughly the kernels launched) and the host reads (each drains
a GPU's queue), on the CPU with a ``TorchDispatchMode``, the kernels taking their GPU layout
(:func:`gpu_layout_on_cpu`): on CPU tensors they otherwise take the squared sums parameter by
parameter, a number of operations that grows with depth and costs no launch there. AdamW takes
its GPU layout too: its ``foreach`` implementation, torch's default for CUDA tensors (on CPU
tensors it defaults to a loop over the parameters, about ten operations each).
``Tensor.tolist`` does not dispatch, so its calls are counted apart. Views (:data:`VIEW_OPS`)
dispatch but launch no kernel: they are counted, and reported, apart from the launching
operations."""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import gaugefix
from gaugefix import kernels, zoo

HOST_READS = ("aten._local_scalar_dense", "Tensor.tolist")
# The aten operations that make a view of their input (new sizes and strides over its storage)
# or change its metadata in place: no kernel is launched for them. Every one returns an alias
# of its input per its schema (``Tensor(a)``) or carries ``torch.Tag.inplace_view``, except
# ``_unsafe_view`` (``reshape``'s view of a fresh tensor, whose schema declares no alias).
VIEW_OPS = frozenset(
    f"aten.{name}"
    for name in (
        "view", "_unsafe_view", "_reshape_alias", "reshape", "expand", "split",
        "split_with_sizes", "unbind", "select", "slice", "narrow", "t", "transpose",
        "permute", "squeeze", "unsqueeze", "as_strided", "alias", "detach", "lift_fresh",
        "diagonal", "unflatten", "view_as", "t_", "transpose_", "squeeze_", "unsqueeze_",
        "as_strided_",
    )
)  # fmt: skip
# The profiler's marks around ``optimizer.step()`` (``torch.autograd.profiler.record_function``):
# dispatched, no kernel launched either.
MARKS = frozenset({"profiler._record_function_enter_new", "profiler._record_function_exit"})
TOKENS = 32


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, by name, and ``Tensor.tolist`` calls;
    :attr:`launching` and :attr:`views` split :attr:`total`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> OpCounter:
        self._tolist = tolist = torch.Tensor.tolist
        ops = self.ops

        def counted(t: Tensor, *args, **kwargs):
            ops["Tensor.tolist"] += 1
            return tolist(t, *args, **kwargs)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        """The aten operations (host reads included, ``tolist`` calls not)."""
        return sum(n for name, n in self.ops.items() if name != "Tensor.tolist")

    @property
    def views(self) -> int:
        """The views among :attr:`total` (:data:`VIEW_OPS`): no kernel launched."""
        return sum(n for name, n in self.ops.items() if name in VIEW_OPS)

    @property
    def launching(self) -> int:
        """The operations of :attr:`total` that launch a kernel on a GPU: all but the views and
        the profiler's marks (:data:`MARKS`)."""
        return self.total - self.views - sum(self.ops[name] for name in MARKS)

    @property
    def host_reads(self) -> int:
        return sum(self.ops[name] for name in HOST_READS)


@contextlib.contextmanager
def gpu_layout_on_cpu() -> Iterator[None]:
    """The kernels take their GPU layout (:func:`gaugefix.kernels.gpu_layout`) on CPU tensors
    too, inside the context: the operations counted are those a GPU would launch."""
    with mock.patch.object(kernels, "gpu_layout", lambda device: True):
        yield


def logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out if isinstance(out, Tensor) else out.logits


def counted_step(
    model: nn.Module, structure: gaugefix.GaugeStructure, vocab: int, mode: str | None
) -> OpCounter:
    """The operations of the second ``optimizer.step()`` of AdamW (``foreach``, as on a GPU; not
    fused) on a copy of ``model`` (its state exists then), with ``GaugeFixing`` in ``mode``
    acting at every step, or none, in the kernels' GPU layout."""
    model = copy.deepcopy(model)
    x = torch.randint(0, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    if mode is not None:
        gaugefix.GaugeFixing(opt, model, structure, 0.1, mode, balance_at_start=False, every=1)
    for _ in range(2):
        opt.zero_grad()
        out = logits(model, x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1)).backward()
        counter = OpCounter()
        with gpu_layout_on_cpu(), counter:
            opt.step()
    return counter


def counts(model: nn.Module, vocab: int) -> dict:
    """The launching operations (:attr:`OpCounter.launching`) and host reads of a plain AdamW
    step, what an exact orbit step and a penalty gradient add to it, and those of
    ``imbalance_stats``, in the GPU layout; the views (``*_views``) and all operations
    (``*_total``) apart. ``plain_step`` leaves out AdamW's host reads: those of its step
    counters, which it keeps on the CPU on a GPU too (no launch, no wait for the GPU's queue)."""
    structure = gaugefix.discover(model, torch.randint(0, vocab, (1, TOKENS)))
    plain = counted_step(model, structure, vocab, None)
    row = {
        "generators": structure.num_generators,
        "plain_step": plain.launching - plain.host_reads,
        "plain_step_views": plain.views,
        "plain_step_host_reads": plain.host_reads,
    }
    for mode in ("exact", "penalty"):
        fixed = counted_step(model, structure, vocab, mode)
        row[f"{mode}_added"] = fixed.launching - plain.launching
        row[f"{mode}_views_added"] = fixed.views - plain.views
        row[f"{mode}_total_added"] = fixed.total - plain.total
        row[f"{mode}_host_reads_added"] = fixed.host_reads - plain.host_reads
    gaugefix.imbalance_stats(model, structure)  # builds the plan, once per structure
    stats = OpCounter()
    with gpu_layout_on_cpu(), stats:
        gaugefix.imbalance_stats(model, structure)
    row["imbalance_stats"], row["imbalance_stats_views"] = stats.launching, stats.views
    row["imbalance_stats_host_reads"] = stats.host_reads
    return row


def gpt2(layers: int, width: int) -> nn.Module:
    """GPT-2's architecture (Hugging Face ``GPT2LMHeadModel``) with a ReLU MLP, random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers, n_embd=width, n_head=max(1, width // 64), activation_function="relu"
    )
    return GPT2LMHeadModel(config).train()


def cases(tiny: bool) -> list[tuple[str, int, Callable[[], nn.Module], int]]:
    """``(family, layers, make, vocabulary)``: each family at 2 and 12 layers of one width."""
    if tiny:
        return [
            ("zoo.GPT, width 16", layers, lambda n=layers: zoo.GPT(32, 16, 2, n, 32, TOKENS), 32)
            for layers in (2, 3)
        ]
    return [
        *(("GPT-2, ReLU, width 768", n, lambda n=n: gpt2(n, 768), 50257) for n in (12, 2)),
        *(
            ("zoo.GPT, width 256", n, lambda n=n: zoo.GPT(1024, 256, 4, n, 1024, TOKENS), 1024)
            for n in (12, 2)
        ),
    ]


def run(tiny: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    rows = []
    for family, layers, make, vocab in cases(tiny):
        row = {"family": family, "layers": layers, **counts(make(), vocab)}
        log(
            f"  {family}, {layers} layers (launching ops + views): AdamW step "
            f"{row['plain_step']} + {row['plain_step_views']}; exact orbit step "
            f"+{row['exact_added']} + {row['exact_views_added']}, "
            f"+{row['exact_host_reads_added']} reads; penalty +{row['penalty_added']} + "
            f"{row['penalty_views_added']}, +{row['penalty_host_reads_added']} reads; "
            f"imbalance_stats {row['imbalance_stats']} + {row['imbalance_stats_views']}, "
            f"{row['imbalance_stats_host_reads']} read(s)"
        )
        rows.append(row)
    return rows
