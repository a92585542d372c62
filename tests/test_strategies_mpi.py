"""Each strategy on P ranks against the single-process reference of ALGORITHMS.md."""

from __future__ import annotations

import json

import pytest
import torch

from hpcsgd.config import build_config
from hpcsgd.train.loop import Trainer

from helpers import all_ranks, make_shards
from reference import chunk_plan, simulate, single_process_concatenated

pytestmark = pytest.mark.mpi(min_size=1)

STEPS = 12


def run(shared_tmp, name, **overrides):
    """Train in-process on COMM_WORLD; returns (this rank's flat x_i, the trainer)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    data = make_shards(shared_tmp / "shards", comm.size, partition="label")
    values = {
        "data": str(data),
        "run_dir": str(shared_tmp / name),
        "steps": STEPS,
        "batch_size": 8,
        "lr": 0.2,
        "model": "mlp",
        "mlp_hidden": [16],
        "progress": "none",
        "eval_every": 0.0,
        "log_every": 4,
        "seed": 3,
        **overrides,
    }
    cfg = build_config(values)
    trainer = Trainer(cfg, comm)
    trainer.run()
    return trainer.api.flat.flat.detach().clone(), trainer


def reference(trainer):
    return simulate(trainer.cfg, trainer.membership.P, STEPS)[trainer.membership.rank]


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("q", [1, 2])
def test_sync_equals_single_process_sgd_on_concatenated_batch(shared_tmp, q):
    from mpi4py import MPI

    P = MPI.COMM_WORLD.size
    if q > P:
        pytest.skip("q > P")
    x, trainer = run(shared_tmp, f"sync{q}", algorithm="sync", q=q, momentum=0.9)
    assert all_ranks(close(x, reference(trainer)))
    assert all_ranks(close(x, single_process_concatenated(trainer.cfg, trainer.membership.P, STEPS)))
    all_x = MPI.COMM_WORLD.allgather(x)
    assert all(torch.equal(all_x[0], other) for other in all_x)  # replicas stay identical


@pytest.mark.parametrize("tau,q", [(1, 1), (3, 1), (4, 2)])
def test_local_equals_reference(shared_tmp, tau, q):
    from mpi4py import MPI

    if q > MPI.COMM_WORLD.size:
        pytest.skip("q > P")
    # Weight decay too: a round's 1/L is folded into the optimizer step (ScalingSGD), and
    # the reference averages the plain way, after torch's SGD step.
    x, trainer = run(shared_tmp, f"local{tau}{q}", algorithm="local", tau=tau, q=q, momentum=0.5, weight_decay=1e-3)
    assert all_ranks(close(x, reference(trainer)))


@pytest.mark.parametrize("algorithm,tau,q,weighting", [("sync", 1, 1, "size"), ("sync", 1, 2, "size"),
                                                        ("local", 2, 2, "size"), ("rps", 2, 1, "size"),
                                                        ("local", 2, 1, "uniform")])
def test_unequal_chunks_against_the_size_weighted_reference(shared_tmp, algorithm, tau, q, weighting):
    """dirichlet shards (chunks of very different sizes): draws in proportion to size and loss
    weights that make every sample weigh the same (ALGORITHMS.md, "Data"), against the
    single-process reference written from that rule; sync also against one SGD on the
    concatenated, weighted batch."""
    from mpi4py import MPI

    from hpcsgd.data import read_index

    P = MPI.COMM_WORLD.size
    if q > P:
        pytest.skip("q > P")
    data = make_shards(shared_tmp / "dirichlet", P, partition="dirichlet:0.3", n_train=400)
    sizes = read_index(data).chunk_sizes
    if P > 1:
        assert all_ranks(len(set(sizes)) > 1)  # the case this test is about
    plan = chunk_plan(sizes, q, 8, weighting)
    # The reference's own rule, checked: per step, chunk c weighs |C_c| / N (size) or 1/P
    # (uniform) in the mean over ranks, whatever the rounding of its draws.
    expected = [n / sum(sizes) if weighting == "size" else 1 / P for n in sizes]
    assert all_ranks(all(float(q * n * a / P) == pytest.approx(w) for (n, a), w in zip(plan.values(), expected)))
    x, trainer = run(shared_tmp, f"w-{algorithm}{q}{weighting}", data=str(data), algorithm=algorithm, tau=tau, q=q,
                     drop_rate=0.3 if algorithm == "rps" else 0.0, momentum=0.5, chunk_weighting=weighting)
    assert all_ranks(close(x, reference(trainer)))
    if algorithm == "sync":
        assert all_ranks(close(x, single_process_concatenated(trainer.cfg, P, STEPS)))


def test_local_tau1_q1_plain_sgd_equals_sync(shared_tmp):
    x_local, _ = run(shared_tmp, "l", algorithm="local", tau=1, q=1)
    x_sync, _ = run(shared_tmp, "s", algorithm="sync", q=1)
    assert all_ranks(close(x_local, x_sync))


@pytest.mark.parametrize("tau", [1, 3])
def test_rps_lossless_is_model_averaging_bit_for_bit(shared_tmp, tau):
    """At drop 0 the exchange is one Allreduce whose 1/L rides in the optimizer step, as local
    SGD's: the same arithmetic, so the same bits (and the same rounds; the bytes as its block
    messages, which differ from the ring's 2(L-1)/L share by the uneven cut only)."""
    x_rps, t_rps = run(shared_tmp, "r", algorithm="rps", tau=tau, drop_rate=0.0, momentum=0.9)
    x_local, t_local = run(shared_tmp, "l", algorithm="local", tau=tau, momentum=0.9)
    assert all_ranks(torch.equal(x_rps, x_local))
    c_rps, c_local = t_rps.api.coll.counters, t_local.api.coll.counters
    assert all_ranks(c_rps.rounds == c_local.rounds and c_rps.bytes_saved == 0)
    assert all_ranks(c_rps.bytes_sent == pytest.approx(c_local.bytes_sent, rel=0.01))
    assert all_ranks(c_rps.messages_dropped == 0 and c_rps.arrival in (1.0, None))


def test_lossy_allreduce_lossless_equals_sync(shared_tmp):
    x_lossy, _ = run(shared_tmp, "la", algorithm="lossy-allreduce", drop_rate=0.0)
    x_sync, _ = run(shared_tmp, "s", algorithm="sync")
    assert all_ranks(close(x_lossy, x_sync))


@pytest.mark.parametrize("algorithm,tau,q", [("rps", 1, 1), ("rps", 2, 1), ("rps", 2, 2), ("lossy-allreduce", 1, 1)])
def test_lossy_strategies_equal_reference_with_same_masks(shared_tmp, algorithm, tau, q):
    """RPS composes with RI-SGD's redundancy (q=2): the same reference, q-redundant data."""
    from mpi4py import MPI

    if q > MPI.COMM_WORLD.size:
        pytest.skip("q > P")
    x, trainer = run(shared_tmp, algorithm, algorithm=algorithm, tau=tau, drop_rate=0.3, q=q)
    assert all_ranks(close(x, reference(trainer)))


def test_straggler_sleep_shows_in_its_metrics(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    slow = comm.size - 1
    _, trainer = run(shared_tmp, "straggle", algorithm="local", tau=2, straggle=[f"{slow}@2-4:0.1"])
    last = json.loads(trainer.metrics.path.read_text().splitlines()[-1])
    if comm.rank == slow:
        assert all_ranks(last["straggle_s"] >= 0.3)
    else:
        # The others wait for it inside the averaging rounds: communication time, not their own sleep.
        assert all_ranks(last["straggle_s"] == 0.0 and (comm.size == 1 or last["comm_s"] >= 0.1))


def test_nan_skip_policy_keeps_training(shared_tmp):
    """nan_policy = skip: a step with a non-finite loss is skipped, the run finishes."""
    _, trainer = run(shared_tmp, "nan", algorithm="sync", lr=1e30, nan_policy="skip")
    records = [json.loads(line) for line in trainer.metrics.path.read_text().splitlines()]
    # lr 1e30 blows the model up after the first step; every later loss is skipped, so the
    # windows after it log no loss, and the run still reaches its last step.
    assert all_ranks(records[-1]["step"] == STEPS and records[-1]["loss"] is None)


def test_same_seed_same_metrics_bit_for_bit(shared_tmp):
    x1, t1 = run(shared_tmp, "a", algorithm="rps", drop_rate=0.2)
    x2, t2 = run(shared_tmp, "b", algorithm="rps", drop_rate=0.2)
    assert all_ranks(torch.equal(x1, x2))

    def trajectory(trainer):
        lines = trainer.metrics.path.read_text().splitlines()
        keep = ("step", "loss", "consensus_distance", "bytes_sent", "messages_dropped")
        return [{k: json.loads(line)[k] for k in keep} for line in lines]

    assert all_ranks(trajectory(t1) == trajectory(t2) and len(trajectory(t1)) == STEPS // 4)


@pytest.mark.parametrize("bucket_mb", [0.0001, 0.002, 25.0])
def test_overlapped_sync_equals_blocking_sync(shared_tmp, bucket_mb):
    """Bucketed Iallreduce from gradient hooks gives the blocking result, whatever the buckets."""
    x_overlap, trainer = run(shared_tmp, "o", algorithm="sync", overlap=True, bucket_mb=bucket_mb, momentum=0.9)
    x_block, _ = run(shared_tmp, "b", algorithm="sync", overlap=False, momentum=0.9)
    assert all_ranks(close(x_overlap, x_block))
    buckets = len(trainer.api.buckets)
    assert all_ranks(buckets > 1 if bucket_mb < 0.001 else buckets >= 1)
    assert all_ranks(trainer.api.coll.counters.rounds == STEPS)  # one round per step, however many buckets


@pytest.mark.parametrize("algorithm,tau,drop", [("local", 1, 0.0), ("local", 3, 0.0), ("rps", 1, 0.0),
                                                ("rps", 1, 0.3), ("rps", 2, 0.3)])
def test_overlapped_rounds_equal_the_delayed_averaging_reference(shared_tmp, algorithm, tau, drop):
    """x <- avg + (x - s), one step late, per block for RPS (ALGORITHMS.md, "Overlapped rounds")."""
    import dataclasses

    x, trainer = run(shared_tmp, f"overlap-{algorithm}{tau}{drop}", algorithm=algorithm, tau=tau, drop_rate=drop,
                     momentum=0.5, overlap_rounds=True)
    expected = reference(trainer)
    assert all_ranks(close(x, expected))
    if trainer.membership.P > 1:  # the delay is real: the blocking rule gives other values
        m = trainer.membership
        blocking = simulate(dataclasses.replace(trainer.cfg, overlap_rounds=False), m.P, STEPS)[m.rank]
        assert all_ranks(not close(x, blocking))
    rounds = len([t for t in range(STEPS) if (t + 1) % tau == 0])
    assert all_ranks(trainer.api.coll.counters.rounds == rounds)  # every round started was applied and counted


@pytest.mark.parametrize("algorithm", ["local", "rps"])
def test_overlapped_rounds_with_batchnorm_repeat_bit_for_bit(shared_tmp, algorithm):
    """The round's thread must not copy the model while the next forward updates BatchNorm's
    running statistics (they live in the flat buffer): two runs give the same bits."""
    from mpi4py import MPI

    data = make_shards(shared_tmp / "img", MPI.COMM_WORLD.size, partition="label", features=3 * 8 * 8,
                       input_shape=(3, 8, 8))
    runs = [run(shared_tmp, f"bn-{algorithm}{i}", data=str(data), algorithm=algorithm, model="resnet20",
                batch_size=4, drop_rate=0.2 if algorithm == "rps" else 0.0, overlap_rounds=True)[0] for i in range(2)]
    assert all_ranks(torch.equal(runs[0], runs[1]))
