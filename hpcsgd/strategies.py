"""The four strategies as objects over a user's model and optimizer: one ``step()`` per step.

A user's loop is ``opt.zero_grad(); loss.backward(); strategy.step()``. The object moves the
model's parameters (and floating buffers) into one flat buffer, broadcasts rank 0's model, and
around each optimizer step does what its algorithm says (ALGORITHMS.md): average gradients
(SyncSGD), exchange gradient blocks over lossy links (LossyAllreduce), average models every
``tau`` steps (LocalSGD) or exchange model blocks every ``tau`` steps (RPS). ``hpcsgd train``
builds its strategy through these same classes, so a user's loop and the CLI take the same
steps bit for bit.

Arguments are checked at construction; an error names the argument and its allowed range.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .algorithms import local as _local
from .algorithms import lossy_allreduce as _lossy
from .algorithms import rps as _rps
from .algorithms import sync as _sync
from .comm import Collectives, FlatParams, LinkRates
from .comm.netem import LinkNetwork
from .comm.watchdog import WATCHDOG
from .errors import CheckpointError, ConfigError
from .registry import REGISTRY, Algorithm, algorithm


def _check_samples(samples) -> int:
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
        raise ConfigError(f"step(samples=...) must be the samples this rank's step drew, an integer >= 0, got "
                          f"{samples!r} (average_weights='samples' weighs each rank's model by them)")
    return int(samples)


def _check_tau(tau) -> int:
    if isinstance(tau, bool) or not isinstance(tau, (int, np.integer)) or tau < 1:
        raise ConfigError(f"tau must be an integer >= 1, got {tau!r}")
    return int(tau)


class Strategy:
    """Base of the public strategies: flat model, broadcast, step counting, failures.

    Attributes:
        model, optimizer, world: as given.
        steps: optimizer steps taken through :meth:`step` (the ``t`` of ALGORITHMS.md).
        live_ranks: the run ranks still training (shrinks with :meth:`fail`).
        flat: the :class:`~hpcsgd.comm.FlatParams` holding the model's values.
        coll: the :class:`~hpcsgd.comm.Collectives` over the live ranks.
        algorithm: the per-step algorithm object (``hpcsgd.algorithms``).
    """

    spec: Algorithm

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world, *,
                 network: LinkNetwork | None = None, **options):
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer, self.world = model, optimizer, world
        self.flat = FlatParams(model, flat_grad=self.spec.flat_grad)
        if network is not None and not isinstance(network, LinkNetwork):
            raise ConfigError(f"network must come from hpcsgd.link_network(), got {type(network).__name__}")
        self.coll = Collectives(world.comm, list(world.roles or range(world.size)), network=network)
        self.coll.bcast_(self.flat.flat)  # identical initialisation, not just a shared seed
        self._options = options  # to build the algorithm again for another world (resize)
        self.algorithm = self._build(**options)
        self.steps = 0
        self.live_ranks = list(world.roles or range(world.size))
        self.failed_counters = np.zeros(4)  # traffic of failed ranks, handed to the survivors
        self._synchronized = False  # synchronize() already averaged this step's gradient

    def _build(self, **options):
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def counters(self):
        """Traffic so far: rounds, bytes sent and saved, messages sent and dropped, ``arrival``."""
        return self.coll.counters

    def step(self, marks: list | None = None, samples: int | None = None) -> None:
        """Exchange, optimizer step, averaging round when due; after the user's ``backward()``.

        ``marks``: if a list, the ``time.perf_counter()`` after each of the three phases is
        appended to it (``hpcsgd train`` splits its compute and communication time by them).
        ``samples``: how many samples this rank's step drew (its batch size); needed under
        ``average_weights="samples"``, where a round weighs each rank by its samples since the
        last round (``hpcsgd train`` passes it every step).
        """
        t, algorithm = self.steps, self.algorithm
        WATCHDOG.step = t + 1  # named, as metrics count steps, if a collective times out
        if samples is not None or algorithm.average_weights == "samples":
            algorithm.count_samples(t, _check_samples(samples))  # a round's weights: agreed here
        if self._synchronized:
            self._synchronized = False
        else:
            algorithm.reduce_gradients(t)
        if marks is not None:
            marks.append(time.perf_counter())
        algorithm.optimizer_step(t)
        if marks is not None:
            marks.append(time.perf_counter())
        algorithm.after_step(t)
        if marks is not None:
            marks.append(time.perf_counter())
        self.steps = t + 1

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate into ``.grad`` locally and start no communication.

        DDP's name and meaning: the next backward outside it (the step's last) averages the
        accumulated gradient. Local SGD and RPS average models, not gradients: there it
        changes nothing.
        """
        if self._synchronized:
            raise RuntimeError("no_sync() after synchronize() in the same step: call step() first")
        algorithm = self.algorithm
        before, algorithm.accumulating = algorithm.accumulating, True
        try:
            yield
        finally:
            algorithm.accumulating = before

    def synchronize(self) -> None:
        """Complete this step's gradient averaging now, so the averaged gradient can be read or edited.

        Horovod's name: after it ``.grad`` holds the average over the live ranks (clip it with
        ``torch.nn.utils.clip_grad_norm_``, for example), and the following :meth:`step`
        does not average again. Collective under sync and lossy-allreduce; under local SGD and
        RPS (which average models) it communicates nothing.
        """
        if self.algorithm.accumulating:
            raise RuntimeError("synchronize() inside no_sync(): leave no_sync() and run the step's last backward first")
        if not self._synchronized:
            self.algorithm.reduce_gradients(self.steps)
            self._synchronized = True

    def wait_snapshot(self) -> None:
        """Wait until an overlapped round in flight has copied the model (at once otherwise).

        Call it before writing the model's values between steps; hpcsgd's own readers and
        writers (evaluation, consensus distance, checkpoints) do.
        """
        self.algorithm.wait_snapshot()

    def zero_grad(self) -> None:
        """Clear gradients the cheapest way for this strategy (``optimizer.zero_grad()`` works too)."""
        self.flat.zero_grad()

    def set_contributors(self, flags: np.ndarray | None) -> None:
        """Which live ranks had a finite loss this step (None: all); see ALGORITHMS.md, "Non-finite steps"."""
        self.algorithm.contributors = flags

    def mean_and_consensus(self) -> tuple[torch.Tensor, float]:
        """The live ranks' mean model (flat) and the consensus distance (collective)."""
        self.algorithm.wait_snapshot()
        return self.coll.mean_and_consensus(self.flat.flat)

    @contextmanager
    def averaged_model(self):
        """``with strategy.averaged_model():`` the model holds the live ranks' mean (collective).

        For evaluating the averaged model in one's own loop: on entry every live rank's model
        (parameters and floating buffers) becomes the mean over the live ranks, summed in
        float64; on exit each rank gets its own model back, bit for bit, whatever happened
        inside. An overlapped round in flight is applied first. Do not step inside.
        """
        self.flush()
        flat = self.flat.flat
        own = flat.clone()
        total = self.coll.sum_float64(flat.detach().to("cpu", torch.float64).numpy())
        with torch.no_grad():
            flat.copy_(torch.from_numpy(total / self.coll.size))
        try:
            yield self.model
        finally:
            with torch.no_grad():
                flat.copy_(own)

    def consensus_distance(self) -> float:
        """``(1/L) sum_i ||x_i - mean||^2`` over the live ranks (collective)."""
        return self.mean_and_consensus()[1]

    def fail(self, ranks, survivors=None) -> bool:
        """Ranks ``ranks`` (run ranks) stop for good; the others go on without them (collective).

        Returns whether this rank is still training. A failed rank hands its traffic counts
        to the survivors (:attr:`failed_counters`) and must stop calling :meth:`step`.
        ``survivors``: the communicator of the live ranks when ``ranks`` really died (ULFM,
        see :mod:`hpcsgd.recovery`): it is collective over the survivors only, and the dead
        ranks' traffic died with them.
        """
        failing = sorted({int(r) for r in ranks} & set(self.live_ranks))
        if not failing:
            return True
        if survivors is not None:
            self.live_ranks = [r for r in self.live_ranks if r not in failing]
            self.coll = self.coll.over(survivors, list(self.live_ranks))
            self.algorithm.set_collectives(self.coll)
            return True
        self.flush()  # a round in flight completes among the ranks that started it
        me = self.coll.world_rank
        c = self.coll.counters
        mine = [c.bytes_sent, c.bytes_saved, c.messages_sent, c.messages_dropped] if me in failing else [0] * 4
        self.failed_counters += self.coll.sum_float64(np.array(mine, dtype=np.float64))
        new_coll = self.coll.split_live(me not in failing)
        self.live_ranks = [r for r in self.live_ranks if r not in failing]
        if new_coll is None:
            return False
        self.coll = new_coll
        self.algorithm.set_collectives(new_coll)
        return True

    def flush(self) -> None:
        """Complete and apply an overlapped round still in flight (collective; no-op otherwise).

        With ``overlap_rounds`` the round after a step is applied at the end of the next one;
        call this before saving, evaluating or handing on the model (``hpcsgd train`` does
        before every checkpoint and at the end).
        """
        self.algorithm.flush()

    def resize(self, world) -> None:
        """Go on as the ranks ``world.roles`` of a run of ``world.size`` ranks (collective-free).

        For a resume on fewer processes than the run had (:func:`hpcsgd.load_checkpoint` calls
        it with the run's world): the live ranks become the roles, drop masks and link rules
        are indexed by run rank, and the algorithm is built again over the new ranks. A
        uniform drop rate carries over to the run's P; per-link rates cannot, and are refused.
        """
        options = dict(self._options)
        rates = options.get("rates")
        if rates is not None and rates.phase1.shape[0] != world.size:
            drop_rate = getattr(self, "_drop_rate", None)  # given as one number: rebuilt for the run's P
            options["rates"] = (LinkRates.build(world.size, drop_rate) if drop_rate is not None
                                else _resized_rates(rates, world.size))
        if options.get("network") is not None and world.size != self.world.size:
            raise ConfigError(f"an emulated network of {self.world.size} ranks cannot be carried over to a run of "
                              f"{world.size}: build the strategy without network= to resume on fewer ranks")
        self.flush()
        self.algorithm.close()
        self.world = world
        self.coll = self.coll.over(world.comm, list(world.roles))
        self.live_ranks = list(world.roles)
        self._options = options
        self.algorithm = self._build(**options)

    def state_dict(self) -> dict:
        """Steps, traffic counters, live ranks, the failed ranks' traffic and an overlapped round in flight.

        The round in flight is saved, not applied (collective: it waits for the round), so a
        checkpoint does not change the trajectory; :meth:`load_state_dict` applies it after
        the next step, where it would have landed.
        """
        in_flight = self.algorithm.round_state()  # first: it adds the round's traffic to the counters
        return {
            "round_in_flight": in_flight,
            "samples_since_round": self.algorithm.samples_since_round,  # w_i of the next round (average_weights)
            "steps": self.steps,
            "counters": self.coll.counters.as_dict(),
            "live_ranks": list(self.live_ranks),
            "failed_counters": self.failed_counters.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.coll.counters.load(state["counters"])
        self.failed_counters = np.asarray(state.get("failed_counters", [0.0] * 4), dtype=np.float64)
        self.algorithm.samples_since_round = int(state.get("samples_since_round", 0))
        try:
            self.algorithm.load_round_state(state.get("round_in_flight"))
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None

    def close(self) -> None:
        """Remove the hooks the strategy put on the model (sync's overlapped buckets); free
        its shared-memory windows (collective over the live ranks)."""
        self.algorithm.close()
        self.coll.free_windows()


class SyncSGD(Strategy):
    """Synchronous SGD: the gradient averaged over the live ranks before every optimizer step.

    Args:
        overlap: start bucket Allreduces from gradient hooks while backward runs (like DDP).
        bucket_mb: bucket size in megabytes.
    """

    def __init__(self, model, optimizer, world, *, overlap: bool = True, bucket_mb: float = _sync.DEFAULT_BUCKET_MB,
                 network: LinkNetwork | None = None):
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ConfigError(f"bucket_mb must be a number > 0, got {bucket_mb!r}")
        super().__init__(model, optimizer, world, network=network, overlap=bool(overlap), bucket_mb=float(bucket_mb))

    def _build(self, overlap, bucket_mb):
        return _sync.SyncSGD(self.coll, self.flat, self.optimizer, tau=1, overlap=overlap, bucket_mb=bucket_mb)


class LocalSGD(Strategy):
    """Local SGD (RI-SGD on a redundant sampler): models averaged every ``tau`` steps.

    Where the optimizer is a plain ``torch.optim.SGD``, a round's ``1/L`` rides in the
    optimizer step and the average is one bare Allreduce.

    Args:
        tau: steps between averaging rounds, >= 1.
        average_optimizer_state: average every per-parameter optimizer state tensor with the model
            (SGD momentum, Adam moments, ...; refused, by name, where it cannot be).
        overlap_rounds: run each round behind the next step (applied one step late; see flush()).
        average_weights: ``"equal"`` (1/L) or ``"samples"``: a round weighs each rank by the
            samples it drew since the last one (pass ``step(samples=n)``; unequal batches).
        network: an emulated network from :func:`link_network`.
    """

    def __init__(self, model, optimizer, world, *, tau: int = 1, average_optimizer_state: bool = False,
                 overlap_rounds: bool = False, average_weights: str = "equal", network: LinkNetwork | None = None):
        tau = _check_tau(tau)
        super().__init__(model, optimizer, world, network=network, tau=tau,
                         average_optimizer_state=bool(average_optimizer_state), overlap_rounds=bool(overlap_rounds),
                         average_weights=average_weights)

    def _build(self, tau, average_optimizer_state, overlap_rounds, average_weights):
        return _local.LocalSGD(self.coll, self.flat, self.optimizer, tau=tau,
                               average_optimizer_state=average_optimizer_state, overlap_rounds=overlap_rounds,
                               average_weights=average_weights)


def link_rates(world, drop_rate: float = 0.0, drop_rate_phase1: float | None = None,
               drop_rate_phase2: float | None = None, link_drop=(), matrix=None, ranks_per_node: int = 0) -> LinkRates:
    """Drop rates per link, for :class:`RPS` and :class:`LossyAllreduce` (``rates=``).

    Lowest precedence first: one ``drop_rate``; a rate per phase; a P x P ``matrix``; then the
    ``link_drop`` rules, as the CLI's ``--link-drop``: ``"to:R=x"``, ``"from:R=x"``, ``"S->D=x"``,
    ``"inter-node=x"``, ``"node:A->node:B=x"`` (nodes of ``ranks_per_node`` ranks; 0: as many
    as share rank 0's node). Every rate must be in [0, 1).
    """
    return LinkRates.build(world.size, drop_rate, drop_rate_phase1, drop_rate_phase2, tuple(link_drop), matrix,
                           _nodes(world, link_drop, ranks_per_node))


def link_network(world, latency_ms: float = 0.0, gbps: float = 0.0, latency_rules=(), bandwidth_rules=(),
                 ranks_per_node: int = 0):
    """An emulated network for any strategy (``network=``); None when nothing is emulated.

    ``latency_ms`` per message and ``gbps`` (gigabits/s; 0 = unlimited) on every link, then
    per-link rules as the CLI's ``--link-latency`` / ``--link-bandwidth``: ``"to:R=x"``,
    ``"from:R=x"``, ``"S->D=x"``, ``"inter-node=x"``, ``"node:A->node:B=x"`` (milliseconds,
    Gb/s; nodes as in :func:`link_rates`). See ALGORITHMS.md, "Network emulation".
    """
    nodes = _nodes(world, [*latency_rules, *bandwidth_rules], ranks_per_node)
    return LinkNetwork.build(world.size, latency_ms, gbps, tuple(latency_rules), tuple(bandwidth_rules), nodes)


def _nodes(world, rules, ranks_per_node: int) -> list[int] | None:
    """Each rank's node for rules that name nodes (None when no rule does: nothing to agree on)."""
    if not any("node" in str(rule) for rule in rules):
        return None
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, (int, np.integer)) or ranks_per_node < 0:
        raise ConfigError(f"ranks_per_node must be an integer >= 0 (0: from the node), got {ranks_per_node!r}")
    R = int(ranks_per_node) or world.comm.bcast(world.local_size, root=0)
    return [r // R for r in range(world.size)]


def _resized_rates(rates: LinkRates, size: int) -> LinkRates:
    """The same uniform per-phase drop rates for ``size`` ranks (per-link rates: refused)."""
    mats = []
    for phase in (1, 2):
        m = rates.for_phase(phase)
        off = m[~np.eye(len(m), dtype=bool)]
        if off.size and not np.all(off == off[0]):
            raise ConfigError("per-link drop rates (link_rates with rules or a matrix) are built for "
                              f"{len(m)} ranks and cannot be carried over to a run of {size}; "
                              "resume on as many ranks as the run had")
        full = np.full((size, size), float(off[0]) if off.size else 0.0)
        np.fill_diagonal(full, 0.0)
        mats.append(full)
    return LinkRates(mats[0], mats[1])


def _rates(world, drop_rate, rates) -> LinkRates:
    if rates is not None:
        if not isinstance(rates, LinkRates):
            raise ConfigError(f"rates must come from hpcsgd.link_rates(), got {type(rates).__name__}")
        return rates
    return link_rates(world, drop_rate)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


class RPS(Strategy):
    """RPS: every ``tau`` steps, two-phase block averaging of the models over lossy links.

    Args:
        tau: steps between rounds, >= 1.
        drop_rate: probability in [0, 1) that a block message is lost (every link).
        rates: per-link rates from :func:`link_rates` instead of ``drop_rate``.
        seed: seeds the drop masks (the same on every rank).
        average_optimizer_state: exchange every per-parameter optimizer state tensor through the
            model's blocks and masks (SGD momentum, Adam moments, ...).
        overlap_rounds: run each round behind the next step (applied one step late; see flush()).
        average_weights: ``"equal"`` or ``"samples"``: each block's average over the ranks whose
            block arrived weighs them by the samples they drew since the last round
            (pass ``step(samples=n)``).
        network: an emulated network from :func:`link_network`.
    """

    def __init__(self, model, optimizer, world, *, tau: int = 1, drop_rate: float = 0.0, rates: LinkRates | None = None,
                 seed: int = 0, average_optimizer_state: bool = False, overlap_rounds: bool = False,
                 average_weights: str = "equal", network: LinkNetwork | None = None):
        tau, seed = _check_tau(tau), _check_seed(seed)
        self._drop_rate = drop_rate if rates is None else None
        rates = _rates(world, drop_rate, rates)
        super().__init__(model, optimizer, world, network=network, tau=tau, rates=rates, seed=seed,
                         average_optimizer_state=bool(average_optimizer_state), overlap_rounds=bool(overlap_rounds),
                         average_weights=average_weights)

    def _build(self, tau, rates, seed, average_optimizer_state, overlap_rounds, average_weights):
        return _rps.RPS(self.coll, self.flat, self.optimizer, tau=tau, rates=rates, seed=seed,
                        average_optimizer_state=average_optimizer_state, overlap_rounds=overlap_rounds,
                        average_weights=average_weights)


class LossyAllreduce(Strategy):
    """Gradient averaging by RPS's block exchange every step: the baseline without model averaging.

    Args:
        drop_rate: probability in [0, 1) that a block message is lost.
        rates: per-link rates from :func:`link_rates` instead of ``drop_rate``.
        seed: seeds the drop masks.
    """

    def __init__(self, model, optimizer, world, *, drop_rate: float = 0.0, rates: LinkRates | None = None, seed: int = 0,
                 network: LinkNetwork | None = None):
        seed = _check_seed(seed)
        self._drop_rate = drop_rate if rates is None else None
        rates = _rates(world, drop_rate, rates)
        super().__init__(model, optimizer, world, network=network, rates=rates, seed=seed)

    def _build(self, rates, seed):
        return _lossy.LossyAllreduce(self.coll, self.flat, self.optimizer, tau=1, rates=rates, seed=seed)


for _cls in (SyncSGD, LocalSGD, RPS, LossyAllreduce):
    _cls.spec = next(a for a in REGISTRY.values() if a.strategy == _cls.__name__)


def build(name: str, model, optimizer, world, **options) -> Strategy:
    """The strategy ``name`` (``sync``, ``local``, ``rps``, ``lossy-allreduce``) with its own options."""
    return globals()[algorithm(name).strategy](model, optimizer, world, **options)


__all__ = ["LocalSGD", "LossyAllreduce", "RPS", "Strategy", "SyncSGD", "build", "link_network", "link_rates"]
