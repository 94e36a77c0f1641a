"""A sweep's batches of runs as Ray tasks (``gaugefix sweep/reproduce --executor ray``).

Imported only when that executor is chosen: the library and the local executor never import Ray
(``pip install gaugefix[ray]`` installs it). Each batch of runs is one Ray task with one CPU and
one intra-op thread (:func:`gaugefix.experiments.workers.train_batch`); a task's data travel
through Ray's object store, so the workers need gaugefix installed but not the data files. The
driver stays the store's only writer: :func:`gaugefix.experiments.runner.run_all` writes a
batch's runs as its task's result arrives. A task whose worker or node dies is run again (up to
:data:`MAX_RETRIES` times); a batch's runs are written once, from the result that arrives. A
task that raises ends the command with one line naming its runs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from gaugefix.errors import GaugefixError, first_line
from gaugefix.experiments.engine import RunConfig
from gaugefix.experiments.tasks import Task
from gaugefix.experiments.workers import Trained, Workers, in_this_process, train_batch

__all__ = ["ClusterError", "ray_executor"]

if TYPE_CHECKING:
    from gaugefix.experiments.runner import TaskSpec

MAX_RETRIES = 3  # runs of a task after its worker died
CONNECT_TIMEOUT = 10.0  # seconds to wait for a cluster's address to accept a connection
ANSWER_TIMEOUT = 5.0  # and then for it to answer as a gRPC server does
# The client preface of HTTP/2, which Ray's gRPC servers speak, and an empty SETTINGS frame: a
# gRPC server answers them with a SETTINGS frame (type 4) of its own.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


class ClusterError(GaugefixError, RuntimeError):
    """Ray is not installed, the cluster cannot be reached, a task raised, or the cluster lost a
    task more often than it retries; the message says which."""


def _check_reachable(address: str) -> None:
    """Fail fast on an address nothing listens at, or where something other than a Ray cluster
    (a gRPC server) answers: Ray itself would retry for many minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray-address must be auto, HOST:PORT or ray://HOST:PORT: {address}")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT)
    except OSError as err:
        raise ClusterError(f"cannot reach a Ray cluster at {address}: {err}") from None
    with sock:
        tls = os.environ.get("RAY_USE_TLS", "0").lower() not in ("0", "false", "")
        if not tls and not _answers_http2(sock):
            raise ClusterError(f"no Ray cluster answers at {address}: something else listens there")


def _answers_http2(sock: socket.socket) -> bool:
    """Whether the server at the other end of ``sock`` answers HTTP/2's preface (as Ray's gRPC
    servers do) within :data:`ANSWER_TIMEOUT` seconds."""
    answer = b""
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        sock.sendall(_H2_PREFACE)
        while len(answer) < 9 and (more := sock.recv(9 - len(answer))):
            answer += more
    except OSError:
        return False
    return len(answer) == 9 and answer[3] == 4


@contextmanager
def ray_executor(address: str | None, cpus: int) -> Iterator[Workers]:
    """Connect to the Ray cluster at ``address`` (``"auto"``: the one ``ray start`` made on this
    machine), or start a local Ray instance with ``cpus`` CPUs when ``address`` is None; yield
    its workers for :func:`~gaugefix.experiments.runner.run_all`; cancel the tasks still
    running and disconnect (stopping a local instance) on exit. Raises :class:`ClusterError`
    before anything is started or written. This process's SIGTERM handler stays as it was
    (``ray.init`` would replace it) and Ray's warnings stay off the output."""
    try:
        import ray
    except ImportError:  # said before any address is tried
        raise ClusterError("--executor ray needs Ray: pip install 'gaugefix[ray]'") from None
    if address is not None and address != "auto":
        _check_reachable(address)
    options = {"num_cpus": cpus, "include_dashboard": False} if address is None else {}
    sigterm = signal.getsignal(signal.SIGTERM)
    quiet = _Quiet(logging.getLogger("ray"))
    try:
        ray.init(
            address=address or "local",  # not RAY_ADDRESS nor a cluster `ray start` left
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=False,
            **options,
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        quiet.restore()
        raise _init_error(address, err) from None
    finally:
        # None: a handler not set from Python; and only the main thread may set one
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    workers = RayWorkers()
    try:
        yield workers
    finally:
        workers.cancel()
        ray.shutdown()
        quiet.restore()


def _init_error(address: str | None, err: Exception) -> ClusterError:
    """The one-line error of a ``ray.init`` that failed with ``err``."""
    what = "start a local Ray instance" if address is None else f"join the Ray cluster at {address}"
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
        reason = first_line(err)
    return ClusterError(f"cannot {what}: {reason}")


class _Quiet:
    """Ray's warnings kept off the command's output (it logs one, on starting a local instance,
    about token authentication) until :meth:`restore`; errors still show."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.level = logger, logger.level
        logger.setLevel(max(self.level, logging.ERROR))

    def restore(self) -> None:
        self.logger.setLevel(self.level)


class RayWorkers:
    """Batches as Ray tasks of one CPU, as many at a time as the cluster has CPUs (so each is
    claimed in the store just before it can start). Ray tasks report no progress within a
    batch."""

    def __init__(self) -> None:
        import ray

        self.remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(train_batch_remote)
        self.width = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.tasks: dict[TaskSpec, Any] = {}  # each task's data, put in the object store once
        self.refs: list[Any] = []  # the tasks not known to have finished, for cancel

    def submit(
        self, specs: list[TaskSpec], configs: list[RunConfig], report: Callable[[float], None]
    ) -> Future[Trained]:
        import ray

        for spec in specs:
            if spec not in self.tasks:
                self.tasks[spec] = ray.put(spec.load())
        ref = self.remote.remote(configs, *(self.tasks[spec] for spec in specs))
        # the finished tasks' references dropped, so that Ray frees their results
        self.refs = [*ray.wait(self.refs, num_returns=len(self.refs), timeout=0)[1], ref]
        future: Future[Trained] = Future()
        ref.future().add_done_callback(partial(_settle, future, configs))
        return future

    def deliver(self) -> None:
        """Nothing to pass on."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """``fn(*args)`` in this process: only batches go to the cluster."""
        return in_this_process(fn, *args)

    def cancel(self) -> None:
        """Cancel the tasks not finished."""
        import ray

        for ref in self.refs:
            ray.cancel(ref, force=True)


def train_batch_remote(configs: list[RunConfig], *tasks: Task) -> Trained:
    """:func:`~gaugefix.experiments.workers.train_batch` as a Ray task: each run's task comes as
    an argument of its own, so that Ray passes it from the object store."""
    return train_batch(list(tasks), configs)


def _settle(future: Future[Trained], configs: list[RunConfig], done: Future[Trained]) -> None:
    """Give ``future`` the result of the Ray task ``done`` that trained ``configs``: a one-line
    :class:`ClusterError` when the node could not run it or gaugefix refused it (naming its
    runs), or the task was lost more often than it is retried; any other error as the local
    workers raise it (a bug's traceback)."""
    import ray

    try:
        future.set_result(done.result())
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else err
        if not isinstance(cause, GaugefixError | ray.exceptions.RaySystemError):
            future.set_exception(err)
            return
        future.set_exception(
            ClusterError(
                f"{_runs(configs)} failed on the cluster: {type(cause).__name__}: "
                f"{first_line(cause)}"
            )
        )
    except ray.exceptions.RayError as err:
        future.set_exception(
            ClusterError(
                f"the cluster lost a group of runs (tried {MAX_RETRIES + 1} times): "
                f"{first_line(err)} The finished runs are stored; run the same command to resume."
            )
        )


def _runs(configs: list[RunConfig]) -> str:
    """The runs of a batch, as a one-line error names them."""
    c = configs[0]
    run = f"task {c.task}, method {c.method}, optimizer {c.optimizer}, lr {c.lr:g}, seed {c.seed}"
    return f"the run ({run})" if len(configs) == 1 else f"{len(configs)} runs (the first: {run})"
