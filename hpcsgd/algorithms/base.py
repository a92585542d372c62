"""What every strategy shares: the flat model, its comm layer, step counting, failures, state.

A user's loop is ``opt.zero_grad(); loss.backward(); strategy.step()``. The strategy moves the
model's parameters (and floating buffers) into one flat buffer, broadcasts rank 0's model, and
around each optimizer step does what its algorithm says (ALGORITHMS.md). ``hpcsgd train``
builds its strategy through the same classes, so a user's loop and the CLI take the same steps
bit for bit. A strategy talks to the other ranks only through its comm layer (``collectives=``,
by default a :class:`~hpcsgd.comm.Collectives` over the world), so the same class runs over
MPI and over an in-process fake; whoever reads the run (the trainer, evaluation, RunLog,
checkpoints) asks the strategy, never its communicator.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..comm import Collectives, CommCounters, FlatParams
from ..faults.netem import LinkNetwork
from ..comm.watchdog import WATCHDOG
from ..errors import CheckpointError, ConfigError
from ..optim import scaled_sgd_step

# What state_dict() writes; load_state_dict() reads each and warns where one is missing.
STATE_KEYS = ("round_in_flight", "steps", "counters", "live_ranks", "failed_counters")


def check_int(name: str, value, lowest: int) -> int:
    """``value`` as an int, or a ConfigError naming ``name`` and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
        raise ConfigError(f"{name} must be an integer >= {lowest}, got {value!r}")
    return int(value)


class Strategy:
    """Base of the strategies: flat model, broadcast, step counting, failures, checkpoint state.

    A subclass says what happens around the optimizer step: :meth:`reduce_gradients` (between
    backward and the step), :meth:`optimizer_step`, :meth:`after_step`, and, where it keeps
    buffers over the live ranks, :meth:`set_collectives` and :meth:`close`.

    Args:
        model, optimizer: the user's; the model's parameters move into one flat buffer.
        world: from :func:`hpcsgd.init` (its roles are the run ranks this process plays).
        collectives: the comm layer over the live ranks (default: a
            :class:`~hpcsgd.comm.Collectives` over ``world``); an in-process fake in unit tests.
        network: an emulated network from :func:`hpcsgd.link_network` (with the default layer).

    Attributes:
        steps: optimizer steps taken through :meth:`step` (the ``t`` of ALGORITHMS.md).
        live_ranks: the run ranks still training (shrinks with :meth:`fail`).
        flat: the :class:`~hpcsgd.comm.FlatParams` holding the model's values.
        failed_counters: the traffic failed ranks handed to the survivors (:class:`~hpcsgd.comm.CommCounters`).
        contributors: under ``nan_policy = skip``, which live ranks had a finite loss this step
            (None: all); by default a skipping rank takes no optimizer step and contributes its
            current model (ALGORITHMS.md, "Non-finite steps").

    Example::

        class EveryStepMean(hpcsgd.Strategy):  # a strategy of one's own: models averaged every step
            name = "every-step-mean"

            def after_step(self, step):
                self.coll.allreduce_mean_(self.flat.flat)

        hpcsgd.algorithms.register(Algorithm("every-step-mean", EveryStepMean, uses_tau=False, lossy=False))
        strategy = hpcsgd.algorithms.build("every-step-mean", model, opt, world)
    """

    name = "base"
    flat_grad = False  # exchanges gradients, so keeps them in one flat buffer
    average_weights = "equal"  # model-averaging strategies may weigh ranks by their samples

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world, *,
                 collectives: Collectives | None = None, network: LinkNetwork | None = None):
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer, self.world = model, optimizer, world
        self.flat = FlatParams(model, flat_grad=self.flat_grad)
        self.coll = _collectives(world, collectives, network)
        self.coll.bcast_(self.flat.flat)  # identical initialisation, not just a shared seed
        self.steps = 0
        self.live_ranks = [int(r) for r in self.coll.world_ranks]
        self.failed_counters = CommCounters()
        self.contributors: np.ndarray | None = None  # bool per live rank; None: every rank
        # Inside the public no_sync(): backward passes only accumulate (gradient-sharing strategies).
        self.accumulating = False
        self._synchronized = False  # synchronize() already averaged this step's gradient

    # -- what a strategy supplies ---------------------------------------------------------
    def reduce_gradients(self, step: int) -> None:
        """Between backward and the optimizer step (gradient-sharing strategies)."""

    def optimizer_step(self, step: int) -> None:
        """The optimizer's step (a strategy may fold its own scaling into it); none when skipping."""
        if self.contributes():
            self.optimizer.step()

    def after_step(self, step: int) -> None:
        """After the optimizer step (model-averaging strategies)."""

    def set_collectives(self, coll) -> None:
        """Continue on a new comm layer over other live ranks (after a failure or a resize)."""
        self.coll = coll

    def round_state(self) -> dict | None:
        """The overlapped round in flight as checkpoint data (None: none is), without applying it."""
        return None

    def load_round_state(self, state: dict | None) -> None:
        """Take back a round in flight saved by :meth:`round_state`; it is applied after the next step."""
        if state is not None:
            raise ValueError(f"a {self.name} strategy without overlapped rounds cannot resume a round in flight")

    def wait_snapshot(self) -> None:
        """Wait until an overlapped round in flight has copied the model (at once otherwise).

        Call it before writing the model's values between steps; hpcsgd's own readers and
        writers (evaluation, consensus distance, checkpoints) do.
        """

    def flush(self) -> None:
        """Complete and apply an overlapped round still in flight (collective; no-op otherwise).

        With ``overlap_rounds`` the round after a step is applied at the end of the next one;
        call this before saving, evaluating or handing on the model (``hpcsgd train`` does
        before every checkpoint and at the end).
        """

    def close(self) -> None:
        """Free the shared-memory windows of the comm layer (collective over the live ranks);
        subclasses first remove what they hold on the model (hooks, threads)."""
        self.coll.free_windows()

    # -- the step ----------------------------------------------------------------------------
    def contributes(self) -> bool:
        """Whether this rank's own update counts this step (its loss was finite)."""
        return self.contributors is None or bool(self.contributors[self.coll.rank])

    def count_samples(self, step: int, n: int) -> None:
        """Step ``step`` drew ``n`` samples on this rank (model-averaging strategies weigh by them)."""

    def contributor_count(self) -> int:
        """How many live ranks contribute this step."""
        return self.coll.size if self.contributors is None else int(self.contributors.sum())

    def step(self, marks: list | None = None, samples: int | None = None) -> None:
        """Exchange, optimizer step, averaging round when due; after the user's ``backward()``.

        ``marks``: if a list, the ``time.perf_counter()`` after each of the three phases is
        appended to it (``hpcsgd train`` splits its compute and communication time by them).
        ``samples``: how many samples this rank's step drew (its batch size); needed under
        ``average_weights="samples"``, where a round weighs each rank by its samples since the
        last round (``hpcsgd train`` passes it every step).
        """
        t = self.steps
        WATCHDOG.step = t + 1  # named, as metrics count steps, if a collective times out
        if samples is not None or self.average_weights == "samples":
            self.count_samples(t, _check_samples(samples))  # a round's weights: agreed here
        if self._synchronized:
            self._synchronized = False
        else:
            self.reduce_gradients(t)
        if marks is not None:
            marks.append(time.perf_counter())
        self.optimizer_step(t)
        if marks is not None:
            marks.append(time.perf_counter())
        self.after_step(t)
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
        before, self.accumulating = self.accumulating, True
        try:
            yield
        finally:
            self.accumulating = before

    def synchronize(self) -> None:
        """Complete this step's gradient averaging now, so the averaged gradient can be read or edited.

        Horovod's name: after it ``.grad`` holds the average over the live ranks (clip it with
        ``torch.nn.utils.clip_grad_norm_``, for example), and the following :meth:`step`
        does not average again. Collective under sync and lossy-allreduce; under local SGD and
        RPS (which average models) it communicates nothing.
        """
        if self.accumulating:
            raise RuntimeError("synchronize() inside no_sync(): leave no_sync() and run the step's last backward first")
        if not self._synchronized:
            self.reduce_gradients(self.steps)
            self._synchronized = True

    def zero_grad(self) -> None:
        """Clear gradients the cheapest way for this strategy (``optimizer.zero_grad()`` works too)."""
        self.flat.zero_grad()

    def set_contributors(self, flags: np.ndarray | None) -> None:
        """Which live ranks had a finite loss this step (None: all); see ALGORITHMS.md, "Non-finite steps"."""
        self.contributors = flags

    def set_finite(self, finite: bool) -> None:
        """Tell every live rank whether this rank's loss was finite (collective): :meth:`set_contributors`."""
        self.set_contributors(self.coll.allgather_flags(finite))

    # -- what readers of the run ask -----------------------------------------------------------
    @property
    def counters(self) -> CommCounters:
        """Traffic so far: rounds, bytes sent and saved, messages sent and dropped, ``arrival``."""
        return self.coll.counters

    @property
    def comm(self):
        """The MPI communicator of the live ranks, for whatever agrees or saves over them
        (checkpoints, ``agree()``); the strategy's own traffic goes through its comm layer."""
        return self.coll.comm

    @property
    def live_rank(self) -> int:
        """This process's place among the live ranks (0: the first, which writes the run's files)."""
        return self.coll.rank

    @property
    def exchange_path(self) -> str:
        """How the rounds travel: ``allreduce``, or the block exchange's path (see hpcsgd/comm/exchange.py)."""
        return "allreduce"

    def live_sum(self, values: np.ndarray) -> np.ndarray:
        """``values`` summed over the live ranks in float64 (collective: evaluation, totals)."""
        return self.coll.sum_float64(values)

    def sum_with_squared_norms(self, vector: torch.Tensor) -> tuple[np.ndarray, float]:
        """``(sum_i v_i, sum_i ||v_i||^2)`` over the live ranks, by one Allreduce (gradient diversity)."""
        return self.coll.sum_with_squared_norms(vector)

    def allreduce_max_async(self, values: np.ndarray):
        """Start the maximum of ``values`` over the live ranks; ``wait()`` returns it (the stop flag)."""
        return self.coll.allreduce_max_async(values)

    def network_stats(self) -> dict:
        """Emulated network time of this rank's rounds and how much was not hidden ({} when off)."""
        return self.coll.network_stats()

    def mean_and_consensus(self) -> tuple[torch.Tensor, float]:
        """The live ranks' mean model (flat) and the consensus distance (collective)."""
        self.wait_snapshot()
        return self.coll.mean_and_consensus(self.flat.flat)

    def consensus_distance(self) -> float:
        """``(1/L) sum_i ||x_i - mean||^2`` over the live ranks (collective)."""
        return self.mean_and_consensus()[1]

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

    # -- membership ----------------------------------------------------------------------------
    def fail(self, ranks, survivors=None) -> bool:
        """Ranks ``ranks`` (run ranks) stop for good; the others go on without them (collective).

        Returns whether this rank is still training. A failed rank hands its traffic counts
        to the survivors (:attr:`failed_counters`) and must stop calling :meth:`step`.
        ``survivors``: the communicator of the live ranks when ``ranks`` really died (ULFM,
        see :mod:`hpcsgd.train.recovery`): it is collective over the survivors only, and the dead
        ranks' traffic died with them.
        """
        failing = sorted({int(r) for r in ranks} & set(self.live_ranks))
        if not failing:
            return True
        if survivors is not None:
            self.live_ranks = [r for r in self.live_ranks if r not in failing]
            self.set_collectives(self.coll.over(survivors, list(self.live_ranks)))
            return True
        self.flush()  # a round in flight completes among the ranks that started it
        leaving = self.coll.world_rank in failing
        mine = self.coll.counters if leaving else CommCounters()
        self.failed_counters += CommCounters.from_traffic(self.coll.sum_float64(mine.traffic()))
        new_coll = self.coll.split_live(not leaving)
        self.live_ranks = [r for r in self.live_ranks if r not in failing]
        if new_coll is None:
            return False
        self.set_collectives(new_coll)
        return True

    def resize(self, world) -> None:
        """Go on as the ranks ``world.roles`` of a run of ``world.size`` ranks (collective-free).

        For a resume on fewer processes than the run had (:func:`hpcsgd.load_checkpoint` calls
        it with the run's world): the live ranks become the roles, drop masks and link rules
        are indexed by run rank, and what the strategy keeps over the live ranks is built
        again. A uniform drop rate carries over to the run's P; per-link rates cannot, and
        are refused.
        """
        if self.coll.clock is not None and world.size != self.world.size:
            raise ConfigError(f"an emulated network of {self.world.size} ranks cannot be carried over to a run of "
                              f"{world.size}: build the strategy without network= to resume on fewer ranks")
        self.resize_options(world)
        self.flush()
        self.world = world
        self.live_ranks = list(world.roles)
        self.set_collectives(self.coll.over(world.comm, list(world.roles)))

    def resize_options(self, world) -> None:
        """Carry options indexed by run rank over to ``world``'s P (before anything changes)."""

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Steps, traffic counters, live ranks, the failed ranks' traffic and an overlapped round in flight.

        The round in flight is saved, not applied (collective: it waits for the round), so a
        checkpoint does not change the trajectory; :meth:`load_state_dict` applies it after
        the next step, where it would have landed.
        """
        in_flight = self.round_state()  # first: it adds the round's traffic to the counters
        return {
            "round_in_flight": in_flight,
            "steps": self.steps,
            "counters": self.coll.counters.as_dict(),
            "live_ranks": list(self.live_ranks),
            "failed_counters": self.failed_counters.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore every key :meth:`state_dict` wrote; warn about each one missing (kept as it is).

        ``live_ranks`` is checked, not applied: the live ranks are the comm layer's members,
        formed from the checkpoint's record by the trainer or :func:`hpcsgd.load_checkpoint`;
        a rank the checkpoint counts as failed cannot take its state.
        """
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            warnings.warn(f"strategy state has no {', '.join(missing)} (an older or partial checkpoint): "
                          "kept as they are", stacklevel=2)
        if "live_ranks" in state:
            self._check_live(state["live_ranks"])
        if "steps" in state:
            self.steps = int(state["steps"])
        if "counters" in state:
            self.coll.counters.load(state["counters"])
        if "failed_counters" in state:
            self.failed_counters = _counters(state["failed_counters"])
        try:
            self.load_round_state(state.get("round_in_flight"))
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None

    def _check_live(self, saved) -> None:
        live = [int(r) for r in saved]
        me = self.coll.world_rank
        if me not in live:
            raise CheckpointError(f"run rank {me} had failed when this state was saved (live ranks "
                                  f"{live}): its state cannot be resumed")


def _collectives(world, collectives, network) -> Collectives:
    """The comm layer given, or one over ``world``'s ranks (collective when ``network`` is set)."""
    if network is not None and not isinstance(network, LinkNetwork):
        raise ConfigError(f"network must come from hpcsgd.link_network(), got {type(network).__name__}")
    if collectives is None:
        return Collectives(world.comm, list(world.roles or range(world.size)), network=network)
    if network is not None:
        raise ConfigError("network= goes to the comm layer given as collectives= (Collectives(..., network=)), "
                          "not beside it")
    return collectives


def _counters(saved) -> CommCounters:
    """Counters from a checkpoint: a dict, or the four traffic figures of older checkpoints."""
    if isinstance(saved, dict):
        counters = CommCounters()
        counters.load(saved)
        return counters
    return CommCounters.from_traffic(np.asarray(saved, dtype=np.float64))


def _check_samples(samples) -> int:
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
        raise ConfigError(f"step(samples=...) must be the samples this rank's step drew, an integer >= 0, got "
                          f"{samples!r} (average_weights='samples' weighs each rank's model by them)")
    return int(samples)


def prescaled_optimizer_step(strategy: Strategy, scale: float | None = None) -> None:
    """The optimizer step that also multiplies the model by ``1/L`` (or ``scale``: this rank's
    weight ``w_i / sum w``) in the same pass.

    The round's average is then a bare Allreduce of the sum: no extra pass over the model
    after it (that pass was most of the gap between an averaging round and a raw Allreduce).
    A rank skipping a non-finite step takes no optimizer step but still scales, so that it
    contributes its current model to a sum every rank has scaled alike. For a power-of-two
    ``L`` the result is bit for bit the plain step followed by ``(1/L) * sum``.
    """
    scale = 1.0 / strategy.coll.size if scale is None else scale
    if strategy.contributes():
        scaled_sgd_step(strategy.optimizer, scale)
        strategy.flat.buffers.mul_(scale)  # floating buffers (BatchNorm statistics) are averaged too
    else:
        strategy.flat.flat.mul_(scale)


__all__ = ["STATE_KEYS", "Strategy", "check_int", "prescaled_optimizer_step"]
