"""Where a stage's cases are computed: in this process or on a Ray cluster.

``--engine local`` (the default) computes the cases one after the other in this process.
``--engine ray`` computes them on Ray actors (Ray Core, https://docs.ray.io; ``pip install
"semisam-o1[ray]"``): each actor is started once, loads the model once (``encode``: the ONNX
Runtime session; ``predict``: the network) and then computes the cases the driver sends it,
one at a time (:class:`ray.util.ActorPool`, ``map_unordered``). An actor writes each case
itself into the stage's output with the local engine's own function (``encode._encode_one`` /
``store.write_case``, ``predict.predict_case``), so outputs are atomic and resumable exactly as
with the local engine; only a small summary per case (slices and seconds, or the mean entropy)
comes back to the driver. The driver decides which cases are left to do (the stage's resume
logic) and sends only those.

Cluster: ``--ray-address`` unset starts a new local Ray instance for the call (and shuts it down
afterwards); ``auto`` (``$RAY_ADDRESS``, else the cluster ``ray start`` runs on this machine) or
``HOST:PORT`` joins a running cluster, whose machines must see the dataset and the output folder
at the same paths and have semisam-o1 installed. A process that is already connected
(``ray.init`` called by the caller) is used as it is.

A local instance runs its actors at the caller's priority (``RAY_worker_niceness=0`` unless set;
Ray's default, 15, starves them beside other jobs on a shared machine).

Sizing: ``--threads T`` is the CPU threads of each actor (ONNX Runtime intra-op and torch
threads, ``num_cpus=T``); ``--workers N`` the number of actors. Defaults: T = 1 and N = as many
as the machines hold (sum over machines of CPUs // T); with ``--workers`` given, T = the
cluster's CPUs // N (at most one machine's CPUs). On a GPU cluster (``--device cuda``, or
``auto`` when the cluster has GPUs) each actor holds one GPU (``num_gpus=1``), N defaults to the
cluster's GPUs and T to a GPU's share of its machine's CPUs. N is never more than the cases to do.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

from semisam_o1.core.errors import InputError, OutputError
from semisam_o1.core.settings import Checked, check_range, option

ENGINES = ("local", "ray")


@dataclasses.dataclass(kw_only=True)
class EngineOptions(Checked):
    """Where a stage's cases are computed (see the module docstring). None of these options
    changes a result, so none enters a stage's resume signature."""

    engine: str = option("local", "local: this process; ray: Ray actors, one model load per actor, each "
                         "writing its cases into the same output", choices=ENGINES, neutral=True)
    ray_address: str | None = option(None, "Ray cluster to join: auto ($RAY_ADDRESS, else the one `ray start` runs "
                                     "on this machine) or HOST:PORT (default: start a new local one for this call)",
                                     metavar="ADDR", neutral=True)
    workers: int | None = option(None, "Ray actors (default: the cluster's CPUs // --threads, or its GPUs)",
                                 type=int, metavar="N", neutral=True)

    def __post_init__(self):
        super().__post_init__()
        if self.engine not in ENGINES:
            raise InputError(f"--engine {self.engine}: choose one of {', '.join(ENGINES)}")
        check_range("workers", self.workers, 1)
        if self.engine == "local":
            for name in ("ray_address", "workers"):
                if getattr(self, name) is not None:
                    raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: only with --engine ray")


def run_cases(settings, cases: Sequence[str], local: Callable[[str], Any],
              make_worker: Callable[[Any], Callable[[str], Any]] | None = None, *,
              here: Iterable[str] = ()) -> Iterator[tuple[str, Any]]:
    """Compute ``cases`` with ``settings.engine``; yields ``(case, outcome)`` as each finishes.

    Args:
        settings: a stage's settings with :class:`EngineOptions` and
            :class:`semisam_o1.core.settings.ComputeOptions` (``device``, ``threads``, ``quiet``).
        cases: the case ids left to do (the stage's resume logic decided).
        local: ``local(case)`` computes one case in this process (the local engine).
        make_worker: ``make_worker(actor_settings)`` runs once in each Ray actor and returns the
            actor's ``fn(case)``; picklable (a module-level function or a ``functools.partial``
            of one). ``actor_settings`` is ``settings`` with the actor's ``threads`` and ``device``.
        here: cases computed by ``local`` in this process whatever the engine (encode's
            reduction case, already encoded for the fit).

    Yields:
        ``(case, outcome)``: outcome is what the case's function returned (keep it small: it
        travels through Ray's object store), or the :class:`InputError` it raised, so one bad
        case does not stop the others. Order: ``here`` first, then as cases finish.

    Raises:
        OutputError: an output could not be written (stops everything: every case would fail).
        InputError: a bad ``--ray-address``, a cluster too small for ``--workers`` x ``--threads``,
            ``--device cuda`` on a cluster without GPUs, or an actor that could not start.
    """
    here = [c for c in here if c in cases]
    for case in here:
        yield case, _outcome(local, case)
    rest = [c for c in cases if c not in here]
    if settings.engine == "local":
        for case in rest:
            yield case, _outcome(local, case)
    elif rest:
        if make_worker is None:  # pragma: no cover - every stage on the engine passes one
            raise InputError(f"--engine {settings.engine}: this stage runs on the local engine only")
        yield from _ray_cases(settings, rest, make_worker)


def _outcome(fn: Callable[[str], Any], case: str) -> Any:
    """``fn(case)``, or the InputError it raised (an OutputError is raised on)."""
    try:
        return fn(case)
    except OutputError:
        raise
    except InputError as exc:
        return exc


class _Worker:
    """The Ray actor: builds its case function once (``make_worker``), then computes cases. A worker
    that cannot start (e.g. its machine does not see the dataset) stops the stage with its
    InputError, naming the machine, at its first case."""

    def __init__(self, make_worker, settings):
        self._fn, self._error = None, None
        try:
            self._fn = make_worker(settings)
        except InputError as exc:
            import socket

            self._error = type(exc)(f"a Ray worker on {socket.gethostname()}: {exc}")

    def run(self, case: str) -> tuple[str, Any]:
        if self._error is not None:
            raise self._error
        return case, _outcome(self._fn, case)


def _ray_cases(settings, cases: list[str], make_worker) -> Iterator[tuple[str, Any]]:
    """:func:`run_cases` on Ray actors (connect, size, start the actors, map, clean up)."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise InputError("--engine ray: Ray is not installed (pip install 'semisam-o1[ray]')") from None
    started = _connect(ray, settings)
    actors = []
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        workers, threads, gpus = _size(settings, nodes, len(cases))
        actor_settings = dataclasses.replace(settings, threads=threads, device="cpu" if not gpus else settings.device)
        remote = ray.remote(_Worker).options(num_cpus=threads, num_gpus=gpus)
        actors = [remote.remote(make_worker, actor_settings) for _ in range(workers)]
        if not settings.quiet:
            print(f"ray: {workers} workers x {threads} threads" + (" x 1 GPU" if gpus else "")
                  + f" for {len(cases)} cases", file=sys.stderr, flush=True)
        pool = ActorPool(actors)
        for case, outcome in pool.map_unordered(lambda actor, case: actor.run.remote(case), cases):
            yield case, outcome
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, InputError):
            raise cause from None
        raise
    except ray.exceptions.RayActorError as exc:
        raise InputError(f"--engine ray: a worker stopped: {_message_line(exc)}") from None
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _message_line(exc: BaseException) -> str:
    """The last non-empty line of a (Ray) error's message: the original error's own line."""
    cause = getattr(exc, "cause", None) or exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    return lines[-1] if lines else type(cause).__name__


def _connect(ray, settings) -> bool:
    """Connect this process to Ray; True when this call started the (local) instance.

    Raises:
        InputError: ``--ray-address`` names no reachable cluster, or the local instance did not start
            (Ray waits 30 s for its raylet: a heavily loaded machine can exceed that).
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(log_to_driver=not settings.quiet, logging_level="warning")
    if settings.ray_address is None:
        # a local instance: its actors at this process's priority (Ray nices workers to 15 by default,
        # which starves them beside other jobs on a shared machine), and enough CPUs for what was
        # asked, even beyond the cores (the user's choice)
        os.environ.setdefault("RAY_worker_niceness", "0")
        cpus = os.cpu_count() or 1
        asked = (settings.workers or 1) * (settings.threads or 1)
        kwargs.update(num_cpus=max(cpus, asked), include_dashboard=False)
    try:  # "local": a new instance even where `ray start` runs or RAY_ADDRESS is set
        ray.init(address=settings.ray_address or "local", **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises bare Exception when its processes do not start in time
        if settings.ray_address is None:
            raise InputError(f"--engine ray: the local Ray instance did not start ({_message_line(exc)})") from None
        raise InputError(f"--ray-address {settings.ray_address}: cannot connect ({_message_line(exc)})") from None
    return True


def _size(settings, nodes: Sequence[dict], n_cases: int) -> tuple[int, int, int]:
    """``(workers, threads per worker, GPUs per worker)`` for this cluster (module docstring).

    An actor runs on one machine, so the threads default to what one machine can give and the
    workers must fit the machines: machine i holds ``floor(CPU_i / T)`` CPU actors, or
    ``min(GPU_i, floor(CPU_i / T))`` GPU actors.

    Args:
        settings: with ``workers``, ``threads`` and ``device``.
        nodes: each alive machine's Ray resources (``CPU``, ``GPU`` counts; ``ray.nodes()``).
        n_cases: cases to compute (no more workers than that).

    Raises:
        InputError: the machines lack the CPUs or GPUs asked for.
    """
    cpu = [int(n.get("CPU", 0)) for n in nodes]
    gpu = [int(n.get("GPU", 0)) for n in nodes]
    if settings.device == "cuda" and not sum(gpu):
        raise InputError("--device cuda: the Ray cluster has no GPU (use --device cpu)")
    use_gpu = settings.device != "cpu" and sum(gpu) > 0
    if use_gpu:  # one GPU per actor; its threads: the CPUs of a GPU's share of its machine
        workers = settings.workers or sum(gpu)
        threads = settings.threads or max(1, min(c // g for c, g in zip(cpu, gpu) if g))
        fit = sum(min(g, c // threads) for c, g in zip(cpu, gpu))
    else:
        if settings.threads or not settings.workers:
            threads = settings.threads or 1
        else:
            threads = max(1, min(max(cpu), sum(cpu) // settings.workers))
        fit = sum(c // threads for c in cpu)
        workers = settings.workers or max(1, fit)
    if workers > fit:
        what = "GPUs" if use_gpu else "CPUs"
        have = ", ".join(f"{g if use_gpu else c}" for c, g in zip(cpu, gpu))
        raise InputError(f"--workers {workers} x --threads {threads}: the Ray cluster's machines ({what}: {have}) "
                         f"have room for {fit}")
    return min(workers, n_cases), threads, int(use_gpu)


# --------------------------------------------------------------------------- the stages' actors


