"""A sweep's batched groups as Ray tasks (``gaugefix sweep/reproduce --executor ray``).

Imported only when that executor is chosen: the library and the local executor never import Ray
(``pip install gaugefix[ray]`` installs it). Each batched group of runs is one Ray task with one
CPU and one intra-op thread; a task's data travel through Ray's object store, so the workers need
gaugefix installed but not the data files. The driver stays the store's only writer:
:func:`gaugefix.experiments.runner.run_all` writes a group's runs as its task's result arrives. A
task whose worker or node dies is run again (up to :data:`MAX_RETRIES` times); a group's runs are
written once, from the result that arrives.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from gaugefix.errors import GaugefixError
from gaugefix.experiments.engine import RunConfig, RunResult, train_group
from gaugefix.experiments.runner import Executor, TaskSpec, keep_freed_memory
from gaugefix.experiments.tasks import Task

MAX_RETRIES = 3  # runs of a task after its worker died
CONNECT_TIMEOUT = 10.0  # seconds to wait for a cluster's address to accept a connection


class ClusterError(GaugefixError, RuntimeError):
    """Ray is not installed, the cluster cannot be reached, or it lost a task more often than it
    retries; the message says which."""


def train_batch(task: Task, configs: list[RunConfig]) -> tuple[list[RunResult], float]:
    """One Ray task: train ``configs`` (one batched group) on ``task``, with one thread."""
    keep_freed_memory()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = train_group(task, configs)
    return results, time.perf_counter() - start


def _check_reachable(address: str) -> None:
    """Fail fast on an address nothing listens at (Ray itself would retry for many minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray-address must be auto, HOST:PORT or ray://HOST:PORT: {address}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT).close()
    except OSError as err:
        raise ClusterError(f"cannot reach a Ray cluster at {address}: {err}") from None


@contextmanager
def ray_executor(address: str | None, cpus: int) -> Iterator[Executor]:
    """Connect to the Ray cluster at ``address`` (``"auto"``: the one ``ray start`` made on this
    machine), or start a local Ray instance with ``cpus`` CPUs when ``address`` is None; yield
    the executor for :func:`~gaugefix.experiments.runner.run_all`; disconnect (stopping a local
    instance) on exit. Raises :class:`ClusterError` before anything is started or written."""
    if address is not None and address != "auto":
        _check_reachable(address)
    try:
        import ray
    except ImportError:
        raise ClusterError("--executor ray needs Ray: pip install 'gaugefix[ray]'") from None
    options = {"num_cpus": cpus, "include_dashboard": False} if address is None else {}
    try:
        ray.init(
            address=address or "local",  # not RAY_ADDRESS nor a cluster `ray start` left
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=False,
            **options,
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        what = (
            "start a local Ray instance"
            if address is None
            else f"join the Ray cluster at {address}"
        )
        if "InvalidAuthToken" in f"{err} {err.__cause__}":
            reason = (
                "it asks for Ray's authentication token; set RAY_AUTH_MODE=token (the token "
                "in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
            )
        elif address == "auto" and isinstance(err, ConnectionError):
            reason = (
                "none runs on this machine; start one with `ray start --head`, give "
                "--ray-address HOST:PORT, or leave out --ray-address for a local Ray instance"
            )
        else:
            reason = str(err).strip().splitlines()[0]
        raise ClusterError(f"cannot {what}: {reason}") from None
    try:
        yield _execute
    finally:
        ray.shutdown()


def _execute(
    todo: Iterator[list[RunConfig]],
    spec_of: Callable[[RunConfig], TaskSpec],
    jobs: int,
    on_fraction: Callable[[int, float], None],
) -> Iterator[tuple[int, list[RunResult], float]]:
    """Submit batches as tasks, as many at a time as the cluster has CPUs (so each batch is
    claimed in the store just before it can start), and yield ``(index, results, seconds)`` as
    they arrive; tasks still pending when the caller stops are cancelled. Ray tasks report no
    progress within a batch (``on_fraction`` is not called)."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(train_batch)
    width = max(1, int(ray.cluster_resources().get("CPU", 1)))
    tasks: dict[TaskSpec, ray.ObjectRef] = {}
    running: dict[ray.ObjectRef, int] = {}
    batches = enumerate(todo)
    more = True
    try:
        while running or more:
            while more and len(running) < width:
                item = next(batches, None)
                if item is None:
                    more = False
                    break
                i, batch = item
                spec = spec_of(batch[0])
                if spec not in tasks:
                    tasks[spec] = ray.put(spec.load())
                running[remote.remote(tasks[spec], batch)] = i
            if not running:
                break
            (done,), _ = ray.wait(list(running), num_returns=1)
            index = running.pop(done)
            try:
                results, seconds = ray.get(done)
            except ray.exceptions.RayTaskError:
                raise  # an error in gaugefix's own code, as the local executor would raise it
            except ray.exceptions.RayError as err:
                first = str(err).strip().splitlines()[0]
                raise ClusterError(
                    f"the cluster lost a group of runs (tried {MAX_RETRIES + 1} times): {first} "
                    "The finished runs are stored; run the same command to resume."
                ) from None
            yield index, results, seconds
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
