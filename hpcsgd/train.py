"""The training loop: shards -> sampler -> model step -> strategy -> metrics.

One call of :func:`train` runs on every rank of a communicator. Decisions every rank must
share (steps, log and eval points, failures) derive from the config and the shard index, so
ranks never wait on each other except inside the strategy's collectives and the periodic
diagnostics. Problems a user can fix are raised collectively (see ``comm.agree``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from . import checkpoint as ckpt
from . import startup
from .comm import LinkRates, ulfm
from .recovery import Recovery, check_launch
from .comm.agree import agree
from .comm.device import apply_threads, select_device
from .comm.watchdog import WATCHDOG
from .config import TrainConfig, validate_for_world
from .data import (
    StratifiedSampler,
    adopt_orphans,
    chunk_holders,
    chunks_for_rank,
    coverage,
    draws_per_step,
    held_chunks,
    load_chunk,
    load_chunk_rows,
    load_test,
    read_index,
    sample_plan,
)
from .diversity import intra_gradient_diversity
from .errors import ConfigError, ShardError, TrainingError
from .metrics import MetricsWriter, atomic_write_text, dumps
from .models import build_model
from .optim import ScalingSGD
from .progress import Progress
from .registry import REGISTRY
from .rundir import claim, prepare
from .stop import StopSignal
from .strategies import build as build_strategy
from .user_model import build_user_model, is_factory_spec
from .world import world_for_run

EVAL_BATCH = 1024


@dataclass
class Timers:
    """Cumulative seconds per phase of a step (the report's time breakdown)."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    data_s: float = 0.0
    straggle_s: float = 0.0

    def as_dict(self) -> dict:
        return {k: round(v, 6) for k, v in vars(self).items()}


@dataclass
class Schedule:
    """Step counts shared by every rank, derived from the shard index and the config."""

    steps_per_epoch: int
    total_steps: int
    log_every: int
    eval_every: int  # 0: only at the end
    checkpoint_every: int  # 0: only at the end

    @classmethod
    def from_config(cls, cfg: TrainConfig, train_size: int, parts: int) -> "Schedule":
        # One epoch is one pass over a rank's own chunk, the same for every q (ALGORITHMS.md);
        # it is computed from the mean chunk size so that every rank runs the same steps.
        spe = max(1, math.ceil(train_size / parts / cfg.batch_size))
        total = cfg.steps if cfg.steps > 0 else max(1, round(cfg.epochs * spe))
        log_every = cfg.log_every or max(1, spe // 10)
        eval_every = round(cfg.eval_every * spe) if cfg.eval_every > 0 else 0
        return cls(spe, total, log_every, max(eval_every, 0), cfg.checkpoint_every)

    def lr_at(self, cfg: TrainConfig, step: int) -> float:
        """Learning rate of ``step``: warm-up, then constant, step decay or cosine.

        The cosine runs over the steps after the warm-up, so it starts at ``lr`` where the
        warm-up ends (no jump) and reaches 0 at the end of the run.
        """
        epoch = step / self.steps_per_epoch
        warmup_steps = cfg.warmup_epochs * self.steps_per_epoch
        if warmup_steps > 0 and step < warmup_steps:
            return cfg.lr * (0.1 + 0.9 * step / warmup_steps)
        if cfg.lr_schedule == "step":
            return cfg.lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
        if cfg.lr_schedule == "cosine":
            span = self.total_steps - warmup_steps
            # pi * steps / span in this order: without warm-up, exactly the old arithmetic.
            angle = math.pi * (step - warmup_steps) / span if span > 0 else math.pi
            return cfg.lr * 0.5 * (1 + math.cos(angle))
        return cfg.lr


@dataclass
class RankData:
    """The chunks this rank holds, as tensors on its device, plus the test split."""

    chunks: dict[int, tuple[torch.Tensor, torch.Tensor]]
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_train_eval: torch.Tensor | None = None  # a fixed sample of the whole training set
    y_train_eval: torch.Tensor | None = None
    numpy_chunks: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def train(cfg: TrainConfig, comm: MPI.Comm | None = None) -> dict | None:
    """Run one training job on every rank of ``comm``; returns the summary on rank 0."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    return Trainer(cfg, comm).run()


class Trainer:
    """Holds one rank's state for a run; :meth:`run` is the whole job."""

    def __init__(self, cfg: TrainConfig, comm: MPI.Comm):
        self.cfg = cfg
        self.world = comm
        self.W = comm.size  # ranks in this job
        self.P = comm.size  # ranks the run started with = shard chunks (set from the index)
        self.rank = comm.rank  # the run's rank this process plays (see _assign_roles)
        self.run_dir = Path(cfg.run_dir)
        self.timers = Timers()
        self.alive = True
        self.skipped_steps = 0  # steps whose loss was not finite (nan_policy = skip)
        # Traffic of ranks that failed, handed to the survivors as they left (summary totals).
        self.failed_counters = np.zeros(4)
        self.diversity_sums = np.zeros(3)  # inter, intra, count: summary means over log steps

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        WATCHDOG.arm(world, cfg.collective_timeout)  # an untimed rendezvous; collectives from here on are timed
        claim(cfg, world)  # this job's lock; refuses a run directory that holds a run
        self.index = agree(world, lambda: read_index(cfg.data), "shards")
        self.P = self.index.parts
        agree(world, lambda: validate_for_world(cfg, self.P, self.index.chunk_sizes), "config")
        agree(world, lambda: check_launch(cfg), "config")
        self.schedule = Schedule.from_config(cfg, self.index.train_size, self.P)
        faults = cfg.fault_schedule(self.P, self.schedule.steps_per_epoch, self.schedule.total_steps)
        # A failure scheduled at or after the last step never happens (warned about below).
        self.faults = {r: s for r, s in faults.items() if s < self.schedule.total_steps}
        if world.rank == 0:
            for message in pointless_settings(cfg, self.schedule.total_steps):
                print(f"hpcsgd: warning: {message}", file=sys.stderr, flush=True)
        self.resume_state = agree(world, self._find_resume, "resume")
        agree(world, self._assign_roles, "shards")
        self.device = agree(world, lambda: select_device(world, cfg.device), "device")
        apply_threads(world, cfg.threads)
        self.rates = agree(world, self._link_rates, "link drop rates")
        self.my_chunks = held_chunks(self.P, cfg.q, self.rank, self.adopted)
        self.data = agree(world, self._load_data, "shards")
        agree(world, self._load_train_eval_sample, "shards")
        self._prepare_run_dir()

        torch.manual_seed(cfg.seed)
        self.model = agree(world, self._build_model, "model").to(self.device)
        self.optimizer = ScalingSGD(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
        # The strategy a user would build (hpcsgd.SyncSGD, ...): it moves the model into a
        # flat buffer, broadcasts rank 0's copy and takes every step.
        # Under ULFM training runs on a duplicate that returns errors (see hpcsgd.recovery).
        run_world = world_for_run(ulfm.training_comm(world), self.roles, self.P, self.device)
        self.api = build_strategy(cfg.algorithm, self.model, self.optimizer, run_world, **self._strategy_options())
        self.flat, self.coll, self.strategy = self.api.flat, self.api.coll, self.api.algorithm
        sizes = {c: self.index.chunk_sizes[c] for c in chunks_for_rank(self.P, cfg.q, self.rank)}
        draws = draws_per_step(cfg.batch_size, self.index.chunk_sizes, cfg.chunk_weighting)
        self.sampler = StratifiedSampler(sizes, {c: draws[c] for c in sizes}, cfg.seed, self.rank)
        for c in (c for c, r in self.adopted.items() if r == self.rank):
            self.sampler.adopt(c, self.index.chunk_sizes[c], draws[c])
        self.start_step = 0
        # Ranks failed (or departed) before a resume point leave at the first step.
        self.live_world = list(self.roles)
        if self.resume_state is not None:
            self.start_step = self.resume_state["step"]
            if self._alive_at(self.rank, self.start_step):
                agree(world, lambda: ckpt.restore(self, self.resume_state), "resume")
            else:
                agree(world, lambda: None, "resume")
        self.api.steps = self.start_step
        self.api.failed_counters = self.failed_counters  # one array: restored totals, then new failures
        self.metrics = MetricsWriter(self.run_dir, self.rank, self.start_step if self.resume_state else None)
        self.stop = StopSignal()
        self.progress = Progress(
            cfg.progress, self.schedule.total_steps, self.start_step, enabled=world.rank == 0
        )
        # Resumed on fewer processes, the ranks that failed or departed never join, so
        # _apply_failures will not re-plan for them; batch sizes are not in checkpoints.
        self._plan_samples()
        if self.departed and world.rank == 0:
            self._say_resized()

    def _strategy_options(self) -> dict:
        """The options of ``cfg.algorithm``'s strategy, from the config."""
        cfg = self.cfg
        if cfg.algorithm == "sync":
            # Diversity needs each rank's own gradient, which an overlapped average
            # overwrites during backward.
            return {"overlap": cfg.overlap and not cfg.grad_diversity, "bucket_mb": cfg.bucket_mb}
        if cfg.algorithm == "local":
            return {"tau": cfg.tau, "average_optimizer_state": cfg.average_optimizer_state}
        lossy = {"rates": self.rates, "seed": cfg.seed}
        if cfg.algorithm == "rps":
            return {"tau": cfg.tau, "average_optimizer_state": cfg.average_optimizer_state, **lossy}
        return lossy

    def _build_model(self):
        shape = tuple(self.index.input_shape)
        if is_factory_spec(self.cfg.model):
            return build_user_model(self.cfg.model, shape, self.index.num_classes)
        try:
            return build_model(self.cfg.model, shape, self.index.num_classes, tuple(self.cfg.mlp_hidden))
        except ConfigError as exc:
            raise ConfigError(f"model {self.cfg.model!r} does not fit the shards (input shape {shape}): {exc}") from None

    def _assign_roles(self) -> None:
        """Which of the run's P ranks each process plays, and who takes over whose chunks.

        Normally process r plays rank r of P. A run resumed from its checkpoint on W < P
        processes (a requeued job with a node gone) keeps the first W ranks that were live
        at the checkpoint; the others depart there. Their chunks that no live rank holds are
        re-assigned round-robin and read from the same shards (unlike a simulated failure,
        whose data is lost by design).
        """
        W, P, meta = self.W, self.P, self.resume_state
        if W > P or (W < P and meta is None):
            hint = " (a run resumes on fewer ranks only from its checkpoint: add --resume)" if W < P else ""
            raise ShardError(
                f"shard directory {self.cfg.data} has P={P} chunks but the job has {W} ranks: launch "
                f"{P} ranks, or re-shard with `hpcsgd shard --parts {W} ...`{hint}"
            )
        start = meta["step"] if meta else 0
        live = meta["live_world"] if meta else list(range(P))
        if W < P and W > len(live):
            raise ShardError(
                f"checkpoint {meta['dir']} has {len(live)} live ranks of {P}: launch at most {len(live)} ranks, or {P}"
            )
        self.roles = list(range(P)) if W == P else live[:W]
        self.rank = self.roles[self.world.rank]
        failed = {r for r, s in self.faults.items() if s <= start}
        training = set(self.roles) & set(live)
        self.departed = sorted(set(range(P)) - training - failed)
        previous = meta["adopted"] if meta else {}
        self.adopted = adopt_orphans(P, self.cfg.q, training - failed, self.departed, previous) if self.departed else {}

    def _say_resized(self) -> None:
        moved = ", ".join(f"chunk {c} -> rank {r}" for c, r in self.adopted.items()) or "none needed"
        extra = f"; {len(self.departed)} spare process(es) exit" if self.W == self.P else ""
        staying = [r for r in self.live_world if self._alive_at(r, self.start_step)]
        print(
            f"hpcsgd: resuming a run of {self.P} ranks on {self.W} processes at step {self.start_step}: "
            f"rank(s) {', '.join(map(str, self.departed))} of the run departed; their chunks are re-assigned "
            f"from the same shards ({moved}); coverage {coverage(self.P, self.cfg.q, staying, self.adopted):.0%}{extra}",
            file=sys.stderr,
            flush=True,
        )

    def _link_rates(self) -> LinkRates:
        matrix = None
        if self.cfg.link_drop_file:
            matrix = _read_matrix(self.cfg.link_drop_file)
        return LinkRates.build(
            self.P,
            self.cfg.drop_rate,
            self.cfg.drop_rate_phase1,
            self.cfg.drop_rate_phase2,
            self.cfg.link_drop,
            matrix,
        )

    def _load_data(self) -> RankData:
        """Read only the chunks this rank holds (plus the test split), checked."""
        numpy_chunks = {c: load_chunk(self.index, c) for c in self.my_chunks}
        x_test, y_test = load_test(self.index)
        dev = self.device
        chunks = {
            c: (torch.from_numpy(np.ascontiguousarray(x)).to(dev), torch.from_numpy(y).to(dev))
            for c, (x, y) in numpy_chunks.items()
        }
        return RankData(chunks, torch.from_numpy(x_test).to(dev), torch.from_numpy(y_test).to(dev), numpy_chunks)

    def _load_train_eval_sample(self) -> None:
        """A fixed sample of every chunk, so eval-time train loss covers the whole data set.

        Each rank's own model is judged on all the data, not just its chunks: on a
        label-skewed partition that is what shows replicas drifting apart.
        """
        wanted = self.cfg.eval_train_samples
        per_chunk = math.ceil(wanted / self.P) if wanted else None
        xs, ys = [], []
        for c, n in enumerate(self.index.chunk_sizes):
            k = n if per_chunk is None else min(n, per_chunk)
            rows = np.sort(np.random.default_rng([self.cfg.seed, 7919, c]).choice(n, k, replace=False))
            if c in self.data.numpy_chunks:
                x, y = self.data.numpy_chunks[c]
                x, y = x[rows], y[rows]
            else:
                x, y = load_chunk_rows(self.index, c, rows)
            xs.append(x)
            ys.append(y)
        self.data.x_train_eval = torch.from_numpy(np.concatenate(xs)).to(self.device)
        self.data.y_train_eval = torch.from_numpy(np.concatenate(ys)).to(self.device)

    def _find_resume(self):
        if not self.cfg.resume:
            return None
        return ckpt.find_latest(self.run_dir, self.cfg, self.P, self.index, self.world)

    def _prepare_run_dir(self) -> None:
        """Move an old run aside (--overwrite), make the folders, write config.toml (see rundir)."""
        prepare(self.world, self.run_dir, self.cfg, self.rank)

    # -- faults --------------------------------------------------------------------------
    def _alive_at(self, world_rank: int, step: int) -> bool:
        fail_step = self.faults.get(world_rank)
        return world_rank not in self.departed and (fail_step is None or step < fail_step)

    def _apply_failures(self, step: int, survivors: MPI.Comm | None = None) -> None:
        """At ``step``, ranks scheduled to fail leave; survivors continue on a new comm.

        ``survivors``: the live ranks' communicator when the ranks really died (hpcsgd.recovery).
        """
        leaving = {**self.faults, **dict.fromkeys(self.departed, self.start_step)}
        failing = [r for r, s in leaving.items() if s <= step and r in self.live_world]
        if not failing:
            return
        self.stop.drain()  # a pending flag exchange must finish on the old communicator
        still_alive = self.api.fail(failing, survivors)
        self.live_world = [r for r in self.live_world if r not in failing]
        if not still_alive:
            self.alive = False
            return
        self.coll = self.api.coll
        self._plan_samples()
        if self.rank == min(self.live_world) and set(failing) - set(self.departed):
            print(
                f"hpcsgd: rank(s) {', '.join(map(str, failing))} failed at step {step}; "
                f"{len(self.live_world)} live ranks, coverage {self.coverage():.0%}",
                file=sys.stderr,
                flush=True,
            )

    def _plan_samples(self) -> None:
        """Draws per held chunk and per-sample loss weights for the live ranks (see sample_plan).

        When every sample of the batch weighs ``1/B`` the loss is torch's plain batch mean,
        so equal chunks give exactly the trajectory of an unweighted loss.
        """
        cfg = self.cfg
        plan = sample_plan(
            cfg.q, cfg.batch_size, self.index.chunk_sizes, self.live_world, self.adopted,
            weighting=cfg.chunk_weighting, reweight=cfg.reweight,
        )[self.rank]
        self.sampler.set_batch_per_chunk({c: n for c, (n, _) in plan.items()})
        self.sample_weights = {c: a for c, (_, a) in plan.items()}
        batch = self.sampler.batch_size
        if all(a == Fraction(1, batch) for a in self.sample_weights.values()):
            self.weight_vector = None
        else:  # one weight per sample, in the sampler's batch order
            self.weight_vector = torch.cat([
                torch.full((n,), float(self.sample_weights[c]), dtype=self.flat.dtype)
                for c, (n, _) in ((c, plan[c]) for c in self.sampler.chunks)
            ]).to(self.device)

    def coverage(self) -> float:
        return coverage(self.P, self.cfg.q, self.live_world, self.adopted)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict | None:
        self.setup()
        startup.mark("setup")
        if self.world.rank == 0 and self.progress.mode != "none":
            print(f"hpcsgd: {startup.line()}", file=sys.stderr, flush=True)
        self.t_start = time.perf_counter() - (self.resume_state or {}).get("wall_s", 0.0)
        self.loss_window: list[float] = getattr(self, "resume_loss_window", [])
        sched = self.schedule
        self.recovery = Recovery(self)
        step = self.start_step
        while True:
            try:
                self.recovery.begin(step)  # under ULFM: the values to redo this step from
                if step == sched.total_steps:
                    return self._end()
                WATCHDOG.step = step + 1  # named, as metrics count steps, if a collective times out
                self._apply_failures(step)
                if not self.alive:
                    self.metrics.close()
                    return None
                self.train_step(step)
                done = step + 1
                if self._is_log_step(step):
                    self.log(step, evaluate=sched.eval_every > 0 and done % sched.eval_every == 0)
                if sched.checkpoint_every and done % sched.checkpoint_every == 0 and done < sched.total_steps:
                    ckpt.save(self, done)
                if self.stop.requested(self.coll):
                    self.stop.drain()
                    ckpt.save(self, done)
                    self.progress.close()
                    self.metrics.close()
                    raise ckpt.Preempted(done)
            except MPI.Exception as exc:  # a rank died (ULFM): redo from the step the survivors agree on
                step = self.recovery.recover(exc, step)  # anything else is raised again
                continue
            step += 1

    def _end(self) -> dict | None:
        """After the last step: final checkpoint, evaluation and summary."""
        self.stop.drain()
        self.progress.close()
        ckpt.save(self, self.schedule.total_steps)
        summary = self.finish()
        self.api.close()
        self.metrics.close()
        return summary

    def train_step(self, step: int) -> None:
        cfg, timers = self.cfg, self.timers
        for rank, first, last, seconds in cfg.stragglers:
            if rank == self.rank and first <= step <= last:
                t = time.perf_counter()
                time.sleep(seconds)
                timers.straggle_s += time.perf_counter() - t

        t0 = time.perf_counter()
        x, y = self._next_batch()
        t1 = time.perf_counter()
        lr = self.schedule.lr_at(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        self.flat.zero_grad()
        self.model.train()
        loss, loss_value = self._loss(x, y)
        finite = math.isfinite(loss_value)
        if finite:
            loss.backward()
            self.loss_window.append(loss_value)
        elif cfg.nan_policy == "stop":
            raise TrainingError(
                f"non-finite training loss ({loss_value}) at step {step} on rank {self.rank}; "
                f"lower the learning rate, or set nan_policy = 'skip'"
            )
        else:  # skip: no backward, so this rank's gradient stays zero; the strategy decides the rest
            self.skipped_steps += 1
        if cfg.nan_policy == "skip":
            # Every rank learns who skipped (one tiny Allgather), so the averages count only
            # the ranks that contributed (ALGORITHMS.md, "Non-finite steps").
            self.api.set_contributors(self.coll.allgather_flags(finite))
        if cfg.grad_diversity and self._is_log_step(step):
            self.diversity = self._gradient_diversity(x, y)  # diagnostics: not timed as compute
        t2 = time.perf_counter()
        marks: list[float] = []
        self.api.step(marks)  # the user's strategy.step(): exchange, optimizer step, averaging round
        t3, t4, t5 = marks
        timers.data_s += t1 - t0
        timers.compute_s += (t2 - t1) + (t4 - t3)
        timers.comm_s += (t3 - t2) + (t5 - t4)

    def _is_log_step(self, step: int) -> bool:
        sched, done = self.schedule, step + 1
        is_eval = sched.eval_every > 0 and done % sched.eval_every == 0
        return done % sched.log_every == 0 or is_eval or done == sched.total_steps

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The loss to differentiate and, for the metrics, the plain batch mean.

        With per-sample weights (unequal chunks, re-weighting) the loss is their weighted sum.
        """
        out = self.model(x)
        if self.weight_vector is None:
            loss = F.cross_entropy(out, y)
            return loss, float(loss.detach())
        losses = F.cross_entropy(out, y, reduction="none")
        return torch.dot(losses, self.weight_vector), float(losses.detach().mean())

    def _gradient_diversity(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Inter-worker and intra-worker gradient diversity (ALGORITHMS.md, "Gradient diversity").

        Inter: ``sum_i ||g_i||^2 / ||sum_i g_i||^2`` over live ranks, one Allreduce. Intra: over
        this rank's per-sample gradients of the batch, ``B sum_k ||h_k||^2 / ||sum_k h_k||^2``.
        """
        total, squares = self.coll.sum_with_squared_norms(self.flat.gradient())
        denominator = float(np.dot(total, total))
        inter = squares / denominator if denominator > 0 else float("nan")
        intra = intra_gradient_diversity(self.model, x, y)
        self.diversity_sums += np.array([inter, intra, 1.0])
        return {"grad_diversity_inter": inter, "grad_diversity_intra": intra}

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return gather_on_device(self.sampler.next_batch(), self.data.chunks)

    # -- metrics -------------------------------------------------------------------------
    def log(self, step: int, evaluate: bool) -> None:
        """One metrics line on every live rank (consensus distance is collective)."""
        done = step + 1
        mean, distance = self.coll.mean_and_consensus(self.flat.flat)
        record = {
            "step": done,
            "epoch": round(done / self.schedule.steps_per_epoch, 6),
            "loss": float(np.mean(self.loss_window)) if self.loss_window else None,
            "lr": self.lr,
            "wall_s": round(time.perf_counter() - self.t_start, 6),
            **self.timers.as_dict(),
            **self.coll.counters.as_dict(),
            "arrival": self.coll.counters.arrival,
            "live_ranks": len(self.live_world),
            "coverage": self.coverage(),
            "consensus_distance": distance,
        }
        if self.cfg.nan_policy == "skip":
            record["skipped_steps"] = self.skipped_steps
        if self.cfg.grad_diversity:
            record.update(getattr(self, "diversity", {}))
        self.loss_window = []
        if evaluate:
            own = self.evaluate(self.data.x_test, self.data.y_test)
            record["test_loss"], record["test_accuracy"] = own["loss"], own["accuracy"]
            own = self.evaluate(self.data.x_train_eval, self.data.y_train_eval)
            record["train_loss_own"], record["train_accuracy_own"] = own["loss"], own["accuracy"]
            avg = self.evaluate_averaged(mean, self.data.x_test, self.data.y_test)
            record["avg_test_loss"], record["avg_test_accuracy"] = avg["loss"], avg["accuracy"]
            avg = self.evaluate_averaged(mean, self.data.x_train_eval, self.data.y_train_eval)
            record["avg_train_loss"], record["avg_train_accuracy"] = avg["loss"], avg["accuracy"]
        self.metrics.write(record)
        self.progress.update(done, record)

    @torch.no_grad()
    def _eval_sums(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """[loss sum, correct, count, correct per class..., count per class...] of the model."""
        k = self.index.num_classes
        sums = np.zeros(3 + 2 * k)
        self.model.eval()
        for start in range(0, len(y), EVAL_BATCH):
            xb, yb = x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
            out = self.model(xb)
            sums[0] += float(F.cross_entropy(out, yb, reduction="sum"))
            hit = out.argmax(1) == yb
            sums[1] += float(hit.sum())
            sums[2] += len(yb)
            sums[3 : 3 + k] += torch.bincount(yb[hit], minlength=k).cpu().numpy()
            sums[3 + k :] += torch.bincount(yb, minlength=k).cpu().numpy()
        return sums

    def _as_metrics(self, sums: np.ndarray) -> dict:
        k = self.index.num_classes
        count = max(sums[2], 1)
        per_class = np.divide(sums[3 : 3 + k], sums[3 + k :], out=np.full(k, np.nan), where=sums[3 + k :] > 0)
        return {
            "loss": float(sums[0] / count),
            "accuracy": float(sums[1] / count),
            "per_class_accuracy": [None if np.isnan(v) else round(float(v), 6) for v in per_class],
        }

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """This rank's own model on (x, y), locally."""
        return self._as_metrics(self._eval_sums(x, y))

    def _eval_share(self) -> tuple[int, int]:
        live = self.live_world
        return live.index(self.rank), len(live)

    def evaluate_averaged(self, mean: torch.Tensor, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> dict:
        """The averaged model on (x, y), or on the full training set when x is None.

        The work is split over the live ranks (every n-th sample, or every n-th chunk) and the
        sums combined by one Allreduce.
        """
        own = self.flat.flat.clone()
        self.flat.flat.copy_(mean)
        try:
            share, n = self._eval_share()
            if x is None:
                sums = np.zeros(3 + 2 * self.index.num_classes)
                for c in range(share, self.P, n):
                    sums += self._eval_sums(*self._chunk_tensors(c))
            else:
                sums = self._eval_sums(x[share::n], y[share::n])
        finally:
            self.flat.flat.copy_(own)
        return self._as_metrics(self.coll.sum_float64(sums))

    def _chunk_tensors(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        if c in self.data.chunks:
            return self.data.chunks[c]
        x, y = load_chunk(self.index, c)  # evaluation only: training never reads it
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def evaluate_own_on_train(self) -> dict:
        """This rank's own model on the full training set, chunk by chunk."""
        sums = np.zeros(3 + 2 * self.index.num_classes)
        for c in range(self.P):
            x, y = self._chunk_tensors(c)
            sums += self._eval_sums(x, y)
        return self._as_metrics(sums)

    # -- the end -------------------------------------------------------------------------
    def finish(self) -> dict | None:
        """Final evaluation of the averaged and the per-rank models; summary.json on rank 0."""
        mean, distance = self.coll.mean_and_consensus(self.flat.flat)
        avg_train = self.evaluate_averaged(mean)
        avg_test = self.evaluate_averaged(mean, self.data.x_test, self.data.y_test)
        totals = self._run_totals(self.evaluate_own_on_train(), self.evaluate(self.data.x_test, self.data.y_test))
        wall = time.perf_counter() - self.t_start
        if self.coll.rank != 0:
            return None
        summary = self._summary(totals, avg_train, avg_test, distance, wall)
        atomic_write_text(self.run_dir / "summary.json", dumps(summary) + "\n")
        return summary

    def _run_totals(self, own_train: dict, own_test: dict) -> np.ndarray:
        """This rank's figures packed in one vector, summed over the live ranks by one Allreduce."""
        c = self.coll.counters
        per_rank = np.array(
            [
                own_train["loss"],
                own_test["accuracy"],
                own_train["accuracy"],
                own_test["loss"],
                c.bytes_sent,
                c.bytes_saved,
                c.messages_sent,
                c.messages_dropped,
                self.timers.compute_s,
                self.timers.comm_s,
                self.timers.data_s,
                self.skipped_steps,
                *self.diversity_sums,
            ]
        )
        totals = self.coll.sum_float64(per_rank)
        # Ranks that failed left their traffic with the survivors (each survivor holds the same sum).
        totals[4:8] += self.failed_counters
        return totals

    def _summary(self, totals: np.ndarray, avg_train: dict, avg_test: dict, distance: float, wall: float) -> dict:
        """summary.json's content (DESIGN.md, "Run directory") from the summed per-rank figures."""
        cfg, c, L = self.cfg, self.coll.counters, self.coll.size
        messages = totals[6] + totals[7]
        return {
            "algorithm": cfg.algorithm,
            "ranks": self.P,
            "q": cfg.q,
            "tau": cfg.tau if REGISTRY[cfg.algorithm].uses_tau else 1,
            "drop_rate": cfg.drop_rate if REGISTRY[cfg.algorithm].lossy else 0.0,
            "steps": self.schedule.total_steps,
            "epochs": round(self.schedule.total_steps / self.schedule.steps_per_epoch, 6),
            "rounds": c.rounds,
            "wall_s": round(wall, 3),
            "bytes_sent": int(totals[4]),
            "bytes_saved": int(totals[5]),
            "arrival_realised": float(totals[6] / messages) if messages else 1.0,
            "skipped_steps": int(totals[11]),
            "live_ranks": L,
            "live_rank_ids": list(self.live_world),
            "coverage": self.coverage(),
            "failures": {str(r): s for r, s in sorted(self.faults.items())},
            "failure_records": self.recovery.failure_records(),
            "reweight": cfg.reweight,
            "chunk_holders": {str(k): v for k, v in chunk_holders(self.P, cfg.q, self.live_world, self.adopted).items()},
            "world_size": self.W,
            "departed": self.departed,
            "adopted_chunks": {str(c): r for c, r in self.adopted.items()},
            "train_loss": avg_train["loss"],
            "train_accuracy": avg_train["accuracy"],
            "test_loss": avg_test["loss"],
            "test_accuracy": avg_test["accuracy"],
            "per_class_accuracy": avg_test["per_class_accuracy"],
            "train_loss_rank_mean": totals[0] / L,
            "test_accuracy_rank_mean": totals[1] / L,
            "train_accuracy_rank_mean": totals[2] / L,
            "test_loss_rank_mean": totals[3] / L,
            "consensus_distance": distance,
            **self._diversity_summary(totals[12:15]),
            "compute_s_mean": totals[8] / L,
            "comm_s_mean": totals[9] / L,
            "data_s_mean": totals[10] / L,
            "model": cfg.model,
            "partition": self.index.partition,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "steps_per_epoch": self.schedule.steps_per_epoch,
        }

    def _diversity_summary(self, sums: np.ndarray) -> dict:
        """Mean diversities over log steps (inter: every rank logs the same value; intra: over ranks too)."""
        if not self.cfg.grad_diversity or sums[2] == 0:
            return {}
        return {"grad_diversity_inter": float(sums[0] / sums[2]), "grad_diversity_intra": float(sums[1] / sums[2])}


def pointless_settings(cfg: TrainConfig, total_steps: int) -> list[str]:
    """Settings that are legal but do nothing in this run, each as a one-line warning.

    The summary records the effective values (drop rate 0, no such failure).
    """
    found = []
    lossy = cfg.drop_rate or cfg.drop_rate_phase1 or cfg.drop_rate_phase2 or cfg.link_drop or cfg.link_drop_file
    if lossy and not REGISTRY[cfg.algorithm].lossy:
        found.append(
            f"drop rates apply to rps and lossy-allreduce only; {cfg.algorithm} sends no block messages "
            f"(recorded as drop_rate 0)"
        )
    if REGISTRY[cfg.algorithm].every_step:
        if cfg.tau != 1:
            found.append(f"tau={cfg.tau} is ignored: {cfg.algorithm} communicates every step")
        if cfg.average_optimizer_state:
            found.append(f"average_optimizer_state does nothing under {cfg.algorithm} (replicas share every step)")
    elif cfg.tau > total_steps:
        found.append(f"tau={cfg.tau} exceeds the run's {total_steps} steps: no averaging round will happen")
    for rank, step in sorted(cfg.faults.items()):
        if step >= total_steps:
            found.append(f"fail {rank}@{step} is at or after the run's last step ({total_steps - 1}): it never happens")
    return found


def gather_on_device(batch, chunks: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples a sampler batch names, from chunks already on the device.

    Indexing happens on the device: only the indices cross PCIe, never the samples.
    """
    xs, ys = [], []
    for c, idx in batch:
        x_c, y_c = chunks[c]
        index = torch.from_numpy(idx).to(x_c.device)
        xs.append(x_c.index_select(0, index))
        ys.append(y_c.index_select(0, index))
    return torch.cat(xs), torch.cat(ys)


def _read_matrix(path: str) -> np.ndarray:
    """A P x P drop-rate matrix from .npy or text (comma or whitespace separated)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"link_drop_file {path} does not exist")
    try:
        if p.suffix == ".npy":
            return np.load(p)
        return np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
    except ValueError as exc:
        raise ConfigError(f"link_drop_file {path} is not a numeric matrix: {exc}") from None


__all__ = ["Schedule", "Trainer", "pointless_settings", "train"]
