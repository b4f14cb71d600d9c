"""The multi-process path: launcher command lines, and DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) vs one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from backend.launch import resolve_num_processes, resolve_train, train_command
from core.config import TrainConfig
from core.errors import ConfigError
from tests.helpers import free_port, make_pairs, make_run, run_launcher, weight


def test_launcher_command_lines():
    py = "/venv/bin/python"
    run_dir = Path("/ws/runs/r001/train")
    assert train_command(run_dir, TrainConfig(), python=py) == [py, "-m", "backend.jobs.train", str(run_dir)]

    ds = TrainConfig(launcher="deepspeed", num_processes=2)
    cmd = train_command(run_dir, ds, python=py, master_port=29711)
    assert cmd == [py, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29711",
                   "--module", "backend.jobs.train", str(run_dir)]

    multi = TrainConfig(launcher="deepspeed", num_processes=8, hostfile="/ws/hostfile")
    cmd = train_command(run_dir, multi, python=py)
    assert cmd == [py, "-m", "deepspeed.launcher.runner", "--hostfile", "/ws/hostfile", "--num_gpus", "8",
                   "--master_port", "29500", "--module", "backend.jobs.train", str(run_dir)]

    # DeepSpeed's own parser reads it as intended: a module with its argument, N slots per node
    from deepspeed.launcher.runner import parse_args

    parsed = parse_args(cmd[3:])
    assert (parsed.hostfile, parsed.num_gpus, parsed.module, parsed.user_script, parsed.user_args) == (
        "/ws/hostfile", 8, True, "backend.jobs.train", [str(run_dir)])


def test_num_processes_auto_counts_the_gpus_and_too_many_stops_before_launch():
    def ds(n, **kw):
        return TrainConfig(launcher="deepspeed", num_processes=n, **kw)

    assert TrainConfig().num_processes == "auto"
    assert [resolve_num_processes(ds("auto"), gpus) for gpus in (0, 1, 8)] == [1, 1, 8]
    assert resolve_num_processes(ds(2), 0) == 2  # CPU ranks (gloo), as the 2-rank tests run
    assert resolve_num_processes(ds(4), 8) == 4
    with pytest.raises(ConfigError, match=r"train.num_processes = 8 but this machine sees 2 CUDA GPU\(s\)"):
        resolve_num_processes(ds(8), 2)
    assert resolve_num_processes(ds(8, hostfile="/ws/hostfile"), 2) == 8  # the ranks run on the hosts listed
    # local runs one process: "auto" is 1 whatever the GPUs; asking for more names the launcher to set
    assert [resolve_num_processes(TrainConfig(), gpus) for gpus in (0, 8)] == [1, 1]
    with pytest.raises(ConfigError, match='train.launcher = "deepspeed"'):
        resolve_num_processes(TrainConfig(num_processes=2), 0)
    assert resolve_train(ds("auto"), 4).num_processes == 4  # what the job's config.json records
    with pytest.raises(ValidationError):
        TrainConfig(num_processes=0)
    with pytest.raises(ValueError, match="resolve"):
        train_command(Path("/ws/run"), ds("auto"))


def test_job_threads_share_the_cores_and_an_explicit_setting_wins(monkeypatch):
    from backend import job_runner

    monkeypatch.setattr(job_runner.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [job_runner.torch_threads(n) for n in (1, 2, 8, 16)] == [7, 3, 1, 1]  # one core left to the owner
    monkeypatch.setattr(job_runner.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert job_runner.job_env()["OMP_NUM_THREADS"] == job_runner.job_env(processes=2)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert job_runner.job_env(processes=2)["OMP_NUM_THREADS"] == "2"


@pytest.mark.slow
def test_zero3_on_two_cpu_ranks_matches_one_process(tiny_model_dir, tmp_path):
    """Same global batch (2 ranks x 1 vs 1 process x 2), same seed and data order: same losses and weights."""
    pairs = make_pairs(tmp_path, 6)
    common = {"max_steps": 3, "loss": ["sigmoid"], "learning_rate": 1e-3, "seed": 0, "merge": True}
    local_dir = make_run(tmp_path / "local", tiny_model_dir, pairs, batch_size=2, **common)
    ds_dir = make_run(tmp_path / "ds", tiny_model_dir, pairs, batch_size=1, launcher="deepspeed",
                      num_processes=2, zero_stage=3, **common)

    def config(run_dir):
        return TrainConfig(**json.loads((run_dir / "config.json").read_text())["train"])

    local_events, _ = run_launcher(train_command(local_dir, config(local_dir)))
    ds_events, _ = run_launcher(train_command(ds_dir, config(ds_dir), master_port=free_port()))

    logs = " | ".join(e["message"] for e in ds_events if e["event"] == "log")
    assert "world size 2, DeepSpeed ZeRO-3" in logs
    assert sum(e["event"] == "done" for e in ds_events) == 1  # rank 1 stays silent

    local_metrics = [e for e in local_events if e["event"] == "metrics"]
    ds_metrics = [e for e in ds_events if e["event"] == "metrics"]
    assert [m["step"] for m in ds_metrics] == [m["step"] for m in local_metrics] == [1, 2, 3]
    for a, b in zip(local_metrics, ds_metrics, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert abs(a["margin"] - b["margin"]) < 1e-4, (a, b)
    assert local_metrics[-1]["margin"] > 1e-3  # the comparison is not between two untrained models

    local_out = Path(next(e for e in local_events if e["event"] == "done")["summary"]["output_dir"])
    ds_out = Path(next(e for e in ds_events if e["event"] == "done")["summary"]["output_dir"])
    assert json.loads((ds_out / "meta.json").read_text())["kind"] == "merged"
    assert json.loads((ds_out / "train_config.json").read_text())["world_size"] == 2
    trained_local, trained_ds, start = weight(local_out), weight(ds_out), weight(tiny_model_dir)
    assert not trained_ds.equal(start)
    assert (trained_ds - trained_local).abs().max() < 1e-4
