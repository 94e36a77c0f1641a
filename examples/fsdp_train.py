"""Soft gauge fixing of a model sharded with FSDP2 (``fully_shard``; CPU, gloo).

    torchrun --nproc_per_node=2 examples/fsdp_train.py
    python examples/fsdp_train.py --single       # the same run on the global batch, one process

Each rank holds a slice of every parameter (a ``DTensor``); FSDP2 averages the gradients
into the slices. ``GaugeFixing`` balances the model at the start and relaxes it after every
step on the slices: each rank sums the squares of its slices per generator, one all-reduce
completes the sums, and every rank then computes the same step and rescales its own slices and
their optimizer state. The last line printed (by rank 0) is a JSON object with ``final_loss`` (the
mean squared error on the whole data set), the gauge-fixing counts, the imbalance statistics
computed on the sharded model, and those of the gathered model (``gathered_imbalance_*``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import gaugefix
from gaugefix import zoo


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32, help="global batch (split over the ranks)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--strength", type=float, default=5.0)
    p.add_argument("--mode", choices=["exact", "penalty"], default="exact")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--gauge", type=float, default=1.0, help="random gauge applied before training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single", action="store_true", help="no process group: one process")
    p.add_argument("--save", default=None, help="write the gathered parameters and state here")
    return p.parse_args()


def make_data(seed: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher-student regression set, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen, dtype=dtype)
    teacher = torch.randn(8, 4, generator=gen, dtype=dtype)
    y = torch.relu(x @ teacher).sum(1, keepdim=True)
    return x, (y - y.mean()) / y.std()


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (every rank takes part), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


def main() -> None:
    args = parse_args()
    distributed = not args.single
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by {world} processes")
    dtype = getattr(torch, args.dtype)

    x, y = make_data(args.seed, 16 * args.batch, dtype)
    torch.manual_seed(args.seed)
    net = zoo.mlp((8, 32, 32, 1)).to(dtype)
    structure = gaugefix.discover(net, x[:1])  # before sharding: the parameter names stay
    gaugefix.random_gauge_(net, structure, args.gauge, torch.Generator().manual_seed(args.seed))
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(net)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    fixing = gaugefix.GaugeFixing(opt, net, structure, args.strength, mode=args.mode)

    order = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.steps):
        idx = torch.randint(len(x), (args.batch,), generator=order)  # the global batch
        shard = idx.chunk(world)[rank]  # equal shards: the mean of the shard means is the mean
        loss = nn.functional.mse_loss(net(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()

    stats = gaugefix.imbalance_stats(net, structure)  # on the slices when sharded
    params = {name: gathered(p) for name, p in net.named_parameters()}
    state = {
        f"{name}.{key}": gathered(value)
        for name, p in net.named_parameters()
        for key, value in opt.state[p].items()
        if key in ("momentum_buffer", "exp_avg", "exp_avg_sq")
    }
    whole = zoo.mlp((8, 32, 32, 1)).to(dtype)
    whole.load_state_dict(params)
    with torch.no_grad():
        final_loss = float(nn.functional.mse_loss(whole(x), y))
    result = {
        "final_loss": final_loss,
        "world_size": world,
        "steps": fixing.steps,
        "skipped": fixing.skipped,
        **{f"imbalance_{k}": v for k, v in stats.items()},
        **{
            f"gathered_imbalance_{k}": v
            for k, v in gaugefix.imbalance_stats(whole, structure).items()
        },
    }
    if rank == 0:
        if args.save:
            torch.save({"params": params, "state": state}, args.save)
        print(json.dumps(result), flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    if "LOCAL_RANK" in os.environ:
        # With torch 2.13 on CPU a gloo worker occasionally aborts during interpreter
        # finalization, after destroy_process_group() returned (see examples/ddp_train.py).
        # Everything is written and flushed by now: leave without finalization.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
