"""The training loop of ``hpcsgd train``: a client of the public API and a few one-job parts.

One call of :func:`train` runs on every rank of a communicator. :func:`~hpcsgd.train.assembly.assemble`
builds the run (shards, membership, model, optimizer, strategy); :class:`~hpcsgd.train.batches.Batches`
draws the batches; the strategy takes each step; :class:`~hpcsgd.train.membership.Membership` removes
failed ranks; :class:`~hpcsgd.train.evaluation.Evaluator` and :class:`~hpcsgd.train.totals.RunTotals` give
the metrics and the summary; :mod:`hpcsgd.checkpoint` saves the dict of their states. Ranks
never wait on each other except inside the strategy's collectives and the periodic diagnostics.
"""

from __future__ import annotations

import math
import sys
import time

from mpi4py import MPI

from .. import checkpoint as ckpt
from . import resume, startup
from .assembly import assemble
from .batches import Batches, gather_on_device
from ..comm.agree import agree
from ..comm.watchdog import WATCHDOG
from ..config import TrainConfig
from .diversity import gradient_diversity
from ..errors import TrainingError
from ..faults.schedule import straggle, stragglers
from .evaluation import Evaluator
from ..metrics import MetricsWriter
from ..progress import Progress
from .recovery import Recovery
from .schedule import Schedule, pointless_settings
from .stop import StopSignal
from .totals import RunTotals, ending_checkpoint, summary, write_summary


def train(cfg: TrainConfig, comm: MPI.Comm | None = None, agreed=None) -> dict | None:
    """Run one training job on every rank of ``comm``; returns the summary on rank 0.

    ``agreed``: the plan :func:`~hpcsgd.train.preflight.agree_on_run` gave, where the caller ran it.
    """
    comm = comm if comm is not None else MPI.COMM_WORLD
    return Trainer(cfg, comm, agreed).run()


class Trainer:
    """One rank's run: assembles the parts (:meth:`setup`) and steps them (:meth:`run`).

    Attributes (after :meth:`setup`): ``job`` (the assembled :class:`~hpcsgd.train.preflight.Job`),
    ``api`` (its strategy), ``membership``, ``batches``, ``evaluator``, ``totals``, ``metrics``.
    """

    def __init__(self, cfg: TrainConfig, comm: MPI.Comm, agreed=None):
        self.cfg, self.world, self.agreed = cfg, comm, agreed
        self.diversity: dict = {}  # the last log step's gradient diversities

    def setup(self) -> None:
        cfg, comm = self.cfg, self.world
        job = self.job = assemble(cfg, comm, self.agreed)
        m, self.api, self.schedule = job.membership, job.strategy, job.schedule
        self.membership = m
        self.batches = Batches(cfg, job.index.chunk_sizes, self.api.world, m, job.data.chunks, self.api.flat.dtype,
                               job.device)
        self.evaluator = Evaluator(self.api, job.index, job.data.chunks, m, job.device)
        self.totals = RunTotals()
        self.start_step = job.start_step
        # Ranks failed (or departed) before a resume point leave at the first step.
        if job.resume is not None and m.alive_at(m.rank, self.start_step):
            agree(comm, lambda: ckpt.restore(job.resume, m.rank, self.parts()), "resume")
        elif job.resume is not None:
            agree(comm, lambda: None, "resume")
        self.api.steps = self.start_step
        self.metrics = agree(comm, lambda: MetricsWriter(job.run_dir, m.rank, job.resume and job.start_step), "metrics")
        self.stop = StopSignal()
        self.progress = Progress(cfg.progress, self.schedule.total_steps, self.start_step, enabled=comm.rank == 0)
        m.before_change.append(self.stop.drain)  # a pending flag exchange must finish on the old communicator
        m.on_change.append(self.batches.replan)
        if m.departed and comm.rank == 0:
            print(m.resized_message(comm.size), file=sys.stderr, flush=True)

    def parts(self) -> dict:
        """The stateful parts a checkpoint holds, by name."""
        return {"model": self.api.model, "optimizer": self.api.optimizer, "rng": ckpt.TorchRNG(),
                "sampler": self.batches, "strategy": self.api, "totals": self.totals}

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps (collective; an overlapped round in flight is saved, not applied)."""
        m, shards = self.membership, resume.shard_identity(self.job.index)
        record = {"ranks": m.P, **m.state_dict(), **resume.identity(self.cfg, shards),
                  "wall_s": float(time.perf_counter() - self.t_start)}
        ckpt.save(self.job.run_dir, self.api.comm, m.rank, self.parts(), step, record, on_error=self.stop.drain)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict | None:
        self.setup()
        startup.mark("setup")
        if self.world.rank == 0 and self.progress.mode != "none":
            print(f"hpcsgd: {startup.line()}", file=sys.stderr, flush=True)
        self.t_start = time.perf_counter() - (self.job.resume or {}).get("wall_s", 0.0)
        self.recovery = Recovery(self.parts, self.membership, self.api, self.stop, self.metrics, self.progress,
                                 self.job.run_dir, self.cfg.fail_mode, self.start_step)
        step = self.start_step
        while True:
            try:
                self.recovery.begin(step)  # under ULFM: the values to redo this step from
                if step == self.schedule.total_steps:
                    return self._end()
                if not self._step(step):
                    self.metrics.close()
                    return None
            except MPI.Exception as exc:  # a rank died (ULFM): redo from the step the survivors agree on
                step = self.recovery.recover(exc, step)  # anything else is raised again
                continue
            step += 1

    def _step(self, step: int) -> bool:
        """Step ``step`` with its failures, metrics, checkpoint and stop check; False: this rank left."""
        sched, m = self.schedule, self.membership
        WATCHDOG.step = step + 1  # named, as metrics count steps, if a collective times out
        if not m.fail(m.due(step), step):
            return False
        self.train_step(step)
        done = step + 1
        if sched.logs_at(step):
            self.log(step, evaluate=sched.evaluates_at(step))
        if sched.checkpoints_after(done):
            self.save(done)
        if self.stop.requested(self.api):
            self.stop.drain()
            self.save(done)
            self.progress.close()
            self.metrics.close()
            raise resume.Preempted(done)
        return True

    def _end(self) -> dict | None:
        """After the last step: summary first (a finished run is never lost), then the final checkpoint."""
        self.stop.drain()
        self.progress.close()
        if self.job.finished:  # resumed after its end: said so (assembly), nothing rewritten
            return self.metrics.close()
        self.api.flush()  # an overlapped round in flight counts in the summary and the checkpoint
        result = self.finish()
        ending_checkpoint(self.job.run_dir, lambda: self.save(self.schedule.total_steps))
        self.api.close()
        self.metrics.close()
        return result

    def train_step(self, step: int) -> None:
        cfg, timers, api = self.cfg, self.totals.timers, self.api
        timers.straggle_s += straggle(stragglers(cfg.straggle), self.membership.rank, step)  # timed apart
        t0 = time.perf_counter()
        x, y = self.batches.next()
        t1 = time.perf_counter()
        self.lr = self.schedule.lr_at(cfg, step)
        for group in api.optimizer.param_groups:
            group["lr"] = self.lr
        api.zero_grad()
        api.model.train()
        loss, loss_value = self.batches.loss(api.model, x, y)
        finite = math.isfinite(loss_value)
        if finite:
            loss.backward()
            self.totals.loss_window.append(loss_value)
        elif cfg.nan_policy == "stop":
            raise TrainingError(
                f"non-finite training loss ({loss_value}) at step {step} on rank {self.membership.rank}; "
                f"lower the learning rate, or set nan_policy = 'skip'"
            )
        else:  # skip: no backward, so this rank's gradient stays zero; the strategy decides the rest
            self.totals.skipped_steps += 1
        if cfg.nan_policy == "skip":
            # Every rank learns who skipped (one tiny Allgather), so the averages count only
            # the ranks that contributed (ALGORITHMS.md, "Non-finite steps").
            api.set_finite(finite)
        if cfg.grad_diversity and self.schedule.logs_at(step):  # diagnostics: not timed as compute
            inter, intra = gradient_diversity(api, x, y)
            self.totals.add_diversity(inter, intra)
            self.diversity = {"grad_diversity_inter": inter, "grad_diversity_intra": intra}
        t2 = time.perf_counter()
        marks: list[float] = []
        api.step(marks, samples=len(y))  # the user's strategy.step(): exchange, optimizer step, averaging round
        t3, t4, t5 = marks
        timers.data_s += t1 - t0
        timers.compute_s += (t2 - t1) + (t4 - t3)
        timers.comm_s += (t3 - t2) + (t5 - t4)
        self.batches.pace.after_step(step, len(y), (t2 - t1) + (t4 - t3), timers, api)  # slowdown, balance

    # -- metrics and the end ---------------------------------------------------------------
    def log(self, step: int, evaluate: bool) -> None:
        """One metrics line on every live rank (consensus distance is collective)."""
        done, api, m = step + 1, self.api, self.membership
        mean, distance = api.mean_and_consensus()
        record = {
            "step": done,
            "epoch": round(done / self.schedule.steps_per_epoch, 6),
            "loss": self.totals.take_loss_window(),
            "lr": self.lr,
            "wall_s": round(time.perf_counter() - self.t_start, 6),
            **self.totals.timers.as_dict(),
            **api.counters.as_dict(),
            "arrival": api.counters.arrival,
            **api.network_stats(),
            "live_ranks": len(m.live),
            "coverage": m.coverage(),
            "consensus_distance": distance, **self.batches.pace.metrics(),
        }
        if self.cfg.nan_policy == "skip":
            record["skipped_steps"] = self.totals.skipped_steps
        if self.cfg.grad_diversity:
            record.update(self.diversity)
        if evaluate:
            record.update(self._evaluations(mean))
        agree(api.comm, lambda: self.metrics.write(record), "metrics")  # a full disk ends every rank
        self.progress.update(done, record)

    def _evaluations(self, mean) -> dict:
        """Own and averaged models on the test split and on the fixed training sample."""
        ev, data = self.evaluator, self.job.data
        own_test, own_train = ev.own(data.x_test, data.y_test), ev.own(data.x_train_eval, data.y_train_eval)
        avg_test = ev.averaged(mean, data.x_test, data.y_test)
        avg_train = ev.averaged(mean, data.x_train_eval, data.y_train_eval)
        return {
            "test_loss": own_test["loss"], "test_accuracy": own_test["accuracy"],
            "train_loss_own": own_train["loss"], "train_accuracy_own": own_train["accuracy"],
            "avg_test_loss": avg_test["loss"], "avg_test_accuracy": avg_test["accuracy"],
            "avg_train_loss": avg_train["loss"], "avg_train_accuracy": avg_train["accuracy"],
        }

    def finish(self) -> dict | None:
        """Final evaluation of the averaged and the per-rank models; summary.json on rank 0."""
        ev, data = self.evaluator, self.job.data
        mean, distance = self.api.mean_and_consensus()
        avg_train = ev.averaged(mean)
        avg_test = ev.averaged(mean, data.x_test, data.y_test)
        totals = self.totals.summed(self.api, ev.own_on_train(), ev.own(data.x_test, data.y_test))
        wall = time.perf_counter() - self.t_start
        result = None
        if self.api.live_rank == 0:
            result = summary(self.job, totals, avg_train, avg_test, distance, wall)
            result.update(self.batches.pace.summary(), failure_records=self.recovery.failure_records())
        return write_summary(self.api.comm, self.job.run_dir, result)


__all__ = ["Schedule", "Trainer", "gather_on_device", "pointless_settings", "train"]
