"""Multi-node training as the owner runs it: the launcher's output read through pdsh's ``host: `` prefix (a
recorded two-host transcript), the env file DeepSpeed's runner exports to every host, the real DeepSpeed
runner driving a stand-in ``pdsh`` (what it is asked to run on the hosts), and each rank's check that it sees
the run folder."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from backend import launch
from backend.job_runner import Job
from backend.jobs.common import check_run_dir
from backend.progress import parse_host_line
from core.config import TrainConfig
from core.errors import JobFailed, UsageError
from tests.helpers import free_port

HOSTFILE = "node1 slots=2\n# the second machine\nnode2 slots=2\n"

# What the deepspeed launcher printed for a 2-host x 2-GPU run (trimmed): its own log lines on the owner's
# host, then every line of each host prefixed by pdsh, the hosts interleaved, library noise among the events.
# node1 is the hostfile's first host: DeepSpeed's node rank 0 and master address, where rank 0 runs.
TRANSCRIPT = """\
[2026-12-07 05:40:01,112] [INFO] [runner.py:607:main] deepspeed_env file = ./.deepspeed_env
[2026-12-07 05:40:01,113] [INFO] [multinode_runner.py:95:get_cmd] Running on the following workers: node1,node2
[2026-12-07 05:40:01,113] [INFO] [runner.py:630:main] cmd = pdsh -S -f 1024 -w node1,node2 export PYTHONPATH=...
node2: [2026-12-07 05:40:03,305] [INFO] [launch.py:146:main] WORLD INFO DICT: {'node1': [0, 1], 'node2': [0, 1]}
node1: [2026-12-07 05:40:03,201] [INFO] [launch.py:146:main] WORLD INFO DICT: {'node1': [0, 1], 'node2': [0, 1]}
node1: [2026-12-07 05:40:03,202] [INFO] [launch.py:164:main] dist_world_size=4
node1: {"event": "log", "message": "6 of 6 pairs used, skipped {}, longest sequence 212 tokens"}
node2: {"event": "log", "message": "6 of 6 pairs used, skipped {}, longest sequence 212 tokens"}
node1: {"event": "log", "message": "loaded policy and reference in 41.0 s; LoRA DPO, loss sigmoid, world size 4"}
node2: Warning: Permanently added 'node2' (ED25519) to the list of known hosts.
node1: {"event": "metrics", "step": 1, "loss": 0.6931, "rewards/margins": 0.0}
node2: {"event": "metrics", "step": 1, "loss": 0.7012, "rewards/margins": 0.0}
node1: {"event": "progress", "done": 1, "total": 2, "unit": "steps"
node1: {"event": "metrics", "step": 2, "loss": 0.6702, "rewards/margins": 0.05}
node1: {"event": "done", "summary": {"method": "dpo", "pairs_used": 6, "steps": 2, "train_loss": 0.68}}
node2: [2026-12-07 05:41:10,877] [INFO] [launch.py:351:main] Process 2 exits successfully.
node1: [2026-12-07 05:41:11,002] [INFO] [launch.py:351:main] Process 0 exits successfully.
"""

FAILED = """\
node1: {"event": "log", "message": "loading the policy"}
node2: {"event": "error", "message": "the workspace must be on a filesystem every node mounts at the same path: /ws/runs/r001/train is not visible on node2"}
node2: [2026-12-07 05:40:04,001] [ERROR] [launch.py:325:sigkill_handler] exits with return code = 2
"""


def multi(tmp_path: Path, **kw) -> TrainConfig:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    return TrainConfig(launcher="deepspeed", num_processes=2, hostfile=str(hostfile), **kw)


def replay(run_dir: Path, text: str, train: TrainConfig, exit_code: int = 0) -> tuple[list[dict], Job]:
    """A job that prints ``text`` (the recorded launcher output) and exits, read by the owner's Job with the
    launcher's parser."""
    (run_dir / "out.txt").write_text(text)
    argv = [sys.executable, "-c", f"import sys; sys.stdout.write(open('out.txt').read()); sys.exit({exit_code})"]
    events: list[dict] = []
    job = Job(argv, run_dir, on_event=events.append, parse=launch.event_parser(train))
    return events, job


def test_a_recorded_two_host_run_reports_rank_zeros_events(tmp_path):
    train = multi(tmp_path)
    events, job = replay(tmp_path, TRANSCRIPT, train)
    result = job.wait()

    assert result.summary == {"method": "dpo", "pairs_used": 6, "steps": 2, "train_loss": 0.68}
    assert result.metrics == [{"step": 1, "loss": 0.6931, "rewards/margins": 0.0},
                              {"step": 2, "loss": 0.6702, "rewards/margins": 0.05}], "node1's only"
    logs = [e["message"] for e in events if e["event"] == "log"]
    assert "loaded policy and reference in 41.0 s; LoRA DPO, loss sigmoid, world size 4" in logs
    # node2's events, the noise and the torn line are kept as log lines, prefix and all
    assert 'node2: {"event": "metrics", "step": 1, "loss": 0.7012, "rewards/margins": 0.0}' in logs
    assert 'node1: {"event": "progress", "done": 1, "total": 2, "unit": "steps"' in logs
    assert "node2: Warning: Permanently added 'node2' (ED25519) to the list of known hosts." in logs
    assert logs[0].endswith("deepspeed_env file = ./.deepspeed_env")
    assert [e["event"] for e in events].count("log") == len(TRANSCRIPT.splitlines()) - 3  # 2 metrics, 1 done
    assert (tmp_path / "job.log").read_text().count("node2: ") == 5, "job.log keeps every line as printed"


def test_an_error_on_another_host_fails_the_job_with_that_host_named(tmp_path):
    events, job = replay(tmp_path, FAILED, multi(tmp_path), exit_code=2)
    with pytest.raises(JobFailed, match="node2: the workspace must be on a filesystem every node mounts at the "
                                        "same path: /ws/runs/r001/train is not visible on node2"):
        job.wait()
    assert [e["event"] for e in events] == ["log", "error", "log"]


def test_the_prefix_is_only_stripped_from_our_events():
    assert parse_host_line('node1: {"event": "progress", "done": 1, "total": 4}\n', "node1") == {
        "event": "progress", "done": 1, "total": 4}
    assert parse_host_line('10.0.0.7: {"event": "log", "message": "hi"}', "10.0.0.7")["message"] == "hi"
    # not ours after the prefix: an ordinary log line, prefix kept
    assert parse_host_line('node1: {"loss": 1}', "node1") == {"event": "log", "message": 'node1: {"loss": 1}'}
    assert parse_host_line("node1: Traceback (most recent call last):", "node1")["message"].startswith("node1: ")
    # no prefix (one node): exactly parse_line
    assert parse_host_line('{"event": "done", "summary": {}}', "node1") == {"event": "done", "summary": {}}
    assert parse_host_line("plain noise", "node1") == {"event": "log", "message": "plain noise"}
    # no main host: every host's events count
    assert parse_host_line('node9: {"event": "done", "summary": {}}')["event"] == "done"


def test_one_node_reads_stdout_as_before(tmp_path):
    assert launch.event_parser(TrainConfig(launcher="deepspeed", num_processes=2)).__name__ == "parse_line"
    assert launch.event_parser(TrainConfig()).__name__ == "parse_line"
    assert launch.event_parser(multi(tmp_path)).keywords == {"main_host": "node1"}
    assert launch.hostfile_names(str(tmp_path / "hostfile")) == ["node1", "node2"]
    assert launch.hostfile_hosts(str(tmp_path / "hostfile")) == 2
    hostfile = tmp_path / "users"  # user@host entries: pdsh labels their lines with the bare host
    hostfile.write_text("me@10.0.0.1 slots=8\nme@10.0.0.2 slots=8\n")
    parse = launch.event_parser(TrainConfig(launcher="deepspeed", num_processes=8, hostfile=str(hostfile)))
    assert parse('10.0.0.1: {"event": "done", "summary": {}}')["event"] == "done"


def test_the_env_file_holds_what_a_rank_needs(tmp_path):
    train = multi(tmp_path)
    env = {"HF_HOME": "/shared/hf", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "/opt/prefloop", "OMP_NUM_THREADS": "4",
           "TORCH_EXTENSIONS_DIR": "/shared/torch_ext", "TRANSFORMERS_OFFLINE": "", "HOME": "/home/me",
           "XDG_CACHE_HOME": "/home/my $cache", "GEMINI_API_KEY": "secret"}
    path = launch.write_rank_env(tmp_path, train, env)
    assert path == tmp_path / ".deepspeed_env"
    # only the variables set (an empty one is not), in RANK_ENV's order; a value the remote shell would
    # expand is left out; nothing else (no keys, no HOME)
    assert path.read_text() == ("HF_HOME=/shared/hf\nHF_HUB_OFFLINE=1\nOMP_NUM_THREADS=4\n"
                                "TORCH_EXTENSIONS_DIR=/shared/torch_ext\nPYTHONPATH=/opt/prefloop\n")
    # DS_ENV_FILE renames it, as DeepSpeed's runner reads it
    assert launch.write_rank_env(tmp_path, train, {"DS_ENV_FILE": "ranks.env"}) == tmp_path / "ranks.env"
    # one node: the ranks inherit the launcher's environment, no file
    assert launch.write_rank_env(tmp_path / "one", TrainConfig(launcher="deepspeed"), env) is None


def test_a_relative_hostfile_still_reaches_the_launcher_from_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    multi(tmp_path)
    cmd = launch.train_command(Path("/ws/runs/r001/train"),
                               TrainConfig(launcher="deepspeed", num_processes=2, hostfile="hostfile"))
    assert cmd[cmd.index("--hostfile") + 1] == str(tmp_path / "hostfile")


FAKE_PDSH = """#!{python}
import json, os, sys
with open(os.environ["FAKE_PDSH_ARGV"], "w") as f:
    json.dump(sys.argv[1:], f)
sys.stdout.write(open(os.environ["FAKE_PDSH_OUTPUT"]).read())
"""
FAKE_SSH = """#!/bin/sh
# stands in for ssh to node1: `hostname` (the runner's reachability check), `hostname -I` (master address)
[ "$3" = "-I" ] && echo 10.0.0.1
exit 0
"""


def test_deepspeeds_runner_exports_the_env_file_and_runs_in_the_run_folder(tmp_path):
    """The real DeepSpeed runner (our command line, the owner's Job, its cwd the run folder) on a stand-in
    pdsh and ssh: what it asks pdsh to run on every host, and the owner reading the hosts' output."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "runs" / "r001" / "train"
    bin_dir.mkdir()
    run_dir.mkdir(parents=True)
    for name, text in (("pdsh", FAKE_PDSH.format(python=sys.executable)), ("ssh", FAKE_SSH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    (tmp_path / "transcript.txt").write_text(TRANSCRIPT)
    train = multi(tmp_path)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HOME": "/shared/hf", "HF_HUB_OFFLINE": "1",
           "FAKE_PDSH_ARGV": str(tmp_path / "pdsh_argv.json"), "FAKE_PDSH_OUTPUT": str(tmp_path / "transcript.txt")}
    from backend.job_runner import job_env

    launch.write_rank_env(run_dir, train, job_env(env, processes=2))
    port = free_port()
    events: list[dict] = []
    result = Job(launch.train_command(run_dir, train, master_port=port), run_dir, env=env,
                 on_event=events.append, parse=launch.event_parser(train)).wait()

    argv = json.loads((tmp_path / "pdsh_argv.json").read_text())
    assert argv[:5] == ["-S", "-f", "1024", "-w", "node1,node2"]
    remote = " ".join(argv[5:])  # the command pdsh runs on each host
    assert "export HF_HOME=/shared/hf; " in remote and "export HF_HUB_OFFLINE=1; " in remote
    assert f"export PYTHONPATH={job_env()['PYTHONPATH']}; " in remote  # the repo importable on each host
    assert f"cd {run_dir}; " in remote, "the ranks start in the run folder: the same path on every host"
    assert "--node_rank=%n" in remote  # pdsh's number of the host
    assert "--master_addr=10.0.0.1" in remote and f"--master_port={port}" in remote
    assert f"{sys.executable} -u -m deepspeed.launcher.launch" in remote, "this interpreter's path on each host"
    assert "--module" in remote and remote.endswith(f" backend.jobs.train {run_dir}")
    assert result.summary["steps"] == 2 and [m["step"] for m in result.metrics] == [1, 2]
    # the runner's own log line (the real one, not the transcript's) shows the exports, unprefixed
    assert any("cmd = pdsh" in e.get("message", "") and "export HF_HOME=/shared/hf" in e["message"] for e in events)


def test_each_rank_checks_it_sees_the_run_folder(tmp_path):
    run_dir = tmp_path / "runs" / "r001" / "train"
    with pytest.raises(UsageError) as err:
        check_run_dir(run_dir, host="node2")
    assert str(err.value) == ("the workspace must be on a filesystem every node mounts at the same path: "
                              f"{run_dir} is not visible on node2")
    run_dir.mkdir(parents=True)
    with pytest.raises(UsageError, match=r"is not visible on \S+$"):  # the folder without the owner's config
        check_run_dir(run_dir)
    (run_dir / "config.json").write_text("{}")
    check_run_dir(run_dir)
