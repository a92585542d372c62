"""The benchmark suite runs and reports every row (its figures are for tools/bench, not tests)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from hpcsgd.bench import fit_cost_model, project

from launch import ROOT, hpcsgd, mpi


@pytest.mark.slow
def test_quick_suite_prints_every_row_under_two_ranks(tmp_path):
    out = tmp_path / "rows.json"
    result = mpi(2, "bench", "--quick", "--json", out, timeout=600)
    assert result.returncode == 0, result.stderr
    for expected in ("averaging round / raw Allreduce", "averaging round, allreduce nonblocking (opt-in, not bit-identical)", "round step's optimizer step (1/L folded in)",
                     "round step (optimizer + average) / (optimizer + raw)", "RPS round, drop 0 (", "RPS round, drop 0.1 (",
                     "two Ialltoallv (the multi-node path)", "hidden share of the round", "network emulation off / absent",
                     "drop masks", "sync-SGD step / DDP step, MLP", "sync-SGD step / DDP step, ResNet-20",
                     "PeriodicModelAverager, MLP", "PeriodicModelAverager, ResNet-20", "HDF5 sampler",
                     "resident MB", "time to 85% test accuracy", "collective watchdog on / off",
                     "Iallreduce + Test polling", "user-loop step (hpcsgd.LocalSGD tau 8) / hpcsgd train step"):
        assert expected in result.stdout, expected
    rows = json.loads(out.read_text())
    assert len(rows) == 22
    keyed = {r["key"]: r for r in rows}
    assert len(keyed) == len(rows)  # every row has a key, and keys are unique: tools compare runs by key
    assert {"watchdog_overhead", "watchdog_polling_alternative", "api_step_vs_cli_step", "local8_api_vs_pma_mlp",
            "local8_api_vs_pma_resnet20", "sync_vs_ddp_mlp", "rps01_vs_allreduce", "rps0_vs_allreduce",
            "avg_vs_allreduce", "avg_nonblocking_vs_allreduce", "overlap_hidden_local", "overlap_hidden_rps", "netem_off_overhead"} <= set(keyed)
    assert keyed["watchdog_overhead"]["target"] == 1.01 and keyed["watchdog_overhead"]["guard_us"] > 0
    # A hidden share is a difference of two step times over the round's: negative when overlapping
    # cost more than it hid (a loaded 2-core machine), but always a number.
    shares = {"overlap_hidden_local", "overlap_hidden_rps"}
    assert all(r["ratio"] is None or r["ratio"] > 0 for r in rows if r["key"] not in shares)
    assert all(math.isfinite(keyed[k]["ratio"]) for k in shares)


@pytest.mark.slow
def test_env_rows_launch_the_demo_both_ways(tmp_path):
    """`hpcsgd bench --env` (no mpiexec): the demo with the default environment vs OMP_NUM_THREADS=1."""
    out = tmp_path / "env.json"
    result = hpcsgd("bench", "--env", "--quick", "--json", out, timeout=900)
    assert result.returncode == 0, result.stderr
    rows = {r["key"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"demo_default_vs_omp1", "demo_process_default_vs_omp1", "demo_launch_to_first_step_s"}
    assert rows["demo_default_vs_omp1"]["target"] == 1.05 and rows["demo_default_vs_omp1"]["ratio"] > 0
    assert 0 < rows["demo_launch_to_first_step_s"]["seconds"] < rows["demo_process_default_vs_omp1"]["seconds"]
    assert "default environment / OMP_NUM_THREADS=1" in result.stdout


def test_bench_env_refuses_to_run_under_mpiexec(tmp_path):
    result = mpi(1, "bench", "--env", "--quick")
    assert result.returncode == 2 and "without mpiexec" in result.stderr


def test_cost_model_recovers_a_known_latency_and_bandwidth():
    alpha, beta = 3e-6, 2e-10
    rows = []
    for P in (2, 4, 8, 16):
        for d in (10**5, 10**6, 10**7):
            nbytes = 4 * d
            rows.append({"ranks": P, "params": d, "bytes": nbytes,
                         "allreduce_s": alpha * 2 * __import__("math").log2(P) + beta * nbytes * 2 * (P - 1) / P,
                         "alltoall_s": alpha * (P - 1) + beta * nbytes * (P - 1) / P})
    fitted = fit_cost_model(rows)
    for kind in ("allreduce", "alltoall"):
        assert fitted[kind]["alpha_s"] == pytest.approx(alpha, rel=1e-6)
        assert fitted[kind]["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)
        assert fitted[kind]["max_rel_error"] < 1e-9


def test_projection_grows_with_ranks_and_prints(tmp_path):
    rows = project(100.0, 2.0)
    big = [r for r in rows if r["model"].startswith("100M")]
    assert [r["ranks"] for r in big] == [16, 64, 256, 1024]
    assert big[-1]["averaging_round_s"] > big[0]["averaging_round_s"]
    # Bandwidth term of a 400 MB Allreduce on 100 Gb/s: about 2 * 400e6 * 8 / 100e9 = 64 ms.
    assert big[-1]["averaging_round_s"] == pytest.approx(0.064, rel=0.05)
    result = hpcsgd("bench", "--project", "--table", tmp_path / "none.json")
    assert result.returncode == 0, result.stderr
    assert "projection on a 100 Gb/s" in result.stdout and "1024" in result.stdout


def test_json_into_a_missing_directory_fails_before_measuring(tmp_path):
    result = mpi(2, "bench", "--quick", "--json", tmp_path / "nodir" / "rows.json", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("--json") == 1 and "directory" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr and "median of" not in result.stdout  # nothing was measured
    assert result.seconds < 30


def test_projection_writes_its_json(tmp_path):
    out = tmp_path / "projection.json"
    result = hpcsgd("bench", "--project", "--table", tmp_path / "none.json", "--fabric-gbps", 200, "--json", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and {r["ranks"] for r in rows} == {16, 64, 256, 1024}
    assert all(r["fabric_gbps"] == 200 and r["averaging_round_s"] > 0 for r in rows)


@pytest.mark.parametrize("argv,message", [
    (["--project", "--fabric-gbps", "0"], "argument --fabric-gbps: must be a finite number in [1e-06, 3.40282e+38] Gb/s, got '0'"),
    (["--project", "--fabric-gbps", "nan"], "argument --fabric-gbps: must be a finite number"),
    (["--project", "--fabric-latency-us", "-1"], "argument --fabric-latency-us: must be a finite number in [0,"),
    (["--project", "--table", "{bad}"], "is not a readable JSON file"),
    (["--project", "--table", "{list}"], "row 0 needs positive finite numbers for bytes, allreduce_s, alltoall_s"),
    (["--reps", "0"], "argument --reps: must be an integer >= 1, got 0"),
    (["--env", "--reps", "-1"], "argument --reps: must be an integer >= 1, got -1"),
    (["--project", "--env"], "--project and --env are different runs: give one of them"),
])
def test_bench_refuses_bad_values_in_one_line(tmp_path, argv, message):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "list.json").write_text('[{"ranks": 2, "bytes": -4}]')
    argv = [a.replace("{bad}", str(tmp_path / "bad.json")).replace("{list}", str(tmp_path / "list.json")) for a in argv]
    result = hpcsgd("bench", *argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1, result.stderr


def test_the_jobs_rows_launch_the_demos_config():
    """The bench's jobs rows write the demo's config themselves (an installed hpcsgd has no jobs/)."""
    import tomllib

    from hpcsgd.bench.jobs import DEMO_CONFIG

    with open(ROOT / "jobs" / "configs" / "digits-risgd.toml", "rb") as fh:
        assert DEMO_CONFIG == tomllib.load(fh)


@pytest.mark.slow
def test_installed_without_e_the_bench_finds_its_data(tmp_path):
    """`pip install .` (no -e, no repository beside it): --project reads the packaged scaling table
    and the jobs rows launch the demo, from a directory outside the repository."""
    source = tmp_path / "src"  # a clean copy: no build/ folder of an earlier install is packaged
    shutil.copytree(ROOT / "hpcsgd", source / "hpcsgd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                          str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=work)

    where = run("import hpcsgd; print(hpcsgd.__file__)")
    assert where.stdout.strip() == str(target / "hpcsgd" / "__init__.py"), where.stderr
    project = subprocess.run([sys.executable, "-m", "hpcsgd", "bench", "--project"], capture_output=True, text=True,
                             timeout=120, env=env, cwd=work)
    assert project.returncode == 0, project.stderr
    assert f"measurements in {target / 'hpcsgd' / 'bench' / 'scaling.json'}" in project.stdout, project.stdout
    assert "no scaling table" not in project.stdout
    demo = run("import json, pathlib, sys\n"
               "from hpcsgd.bench.jobs import _clean_env, _launch_demo\n"
               "from hpcsgd.data import load_source, write_shards\n"
               "d = pathlib.Path('.').resolve()\n"
               "write_shards(load_source('digits'), 4, 'label', d / 's', seed=0)\n"
               "print(json.dumps(_launch_demo(d / 's', d / 'run', _clean_env(OMP_NUM_THREADS='1'), 1)))")
    assert demo.returncode == 0, demo.stderr
    assert json.loads(demo.stdout.splitlines()[-1])["train_loss"] > 0
    config = (work / "digits-risgd.toml").read_text()
    assert 'algorithm = "local"' in config and "tau = 8" in config
