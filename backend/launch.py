"""Command lines that start the training job; pure functions (the owner runs them and reads stdout).

``local``: one process, ``python -m backend.jobs.train RUN_DIR``.
``deepspeed``: DeepSpeed's own launcher, run as ``python -m deepspeed.launcher.runner`` (the same program
as the ``deepspeed`` script, but tied to this interpreter whatever PATH says) with ``--module
backend.jobs.train``. It starts ``num_processes`` ranks per node (``--num_gpus N``: on a machine without GPUs
the ranks are CPU processes, DeepSpeed's CPU accelerator, gloo) and appends ``--local_rank=N`` to each
rank's argv, which backend.jobs.train accepts and ignores. With a hostfile (MPI style, ``host slots=N``) it
starts ``num_processes`` ranks on every host listed, over pdsh/ssh; prefloop must be installed at the same
path on each host.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

from core.config import TrainConfig

DEFAULT_MASTER_PORT = 29500


class Launcher(Protocol):
    def __call__(self, run_dir: Path, train: TrainConfig, *, python: str, master_port: int) -> list[str]: ...


def local_command(run_dir: Path, train: TrainConfig, *, python: str, master_port: int) -> list[str]:
    return [python, "-m", "backend.jobs.train", str(run_dir)]


def deepspeed_command(run_dir: Path, train: TrainConfig, *, python: str, master_port: int) -> list[str]:
    cmd = [python, "-m", "deepspeed.launcher.runner"]
    if train.hostfile:
        cmd += ["--hostfile", str(train.hostfile)]
    cmd += ["--num_gpus", str(train.num_processes), "--master_port", str(master_port),
            "--module", "backend.jobs.train", str(run_dir)]
    return cmd


LAUNCHERS: dict[str, Launcher] = {
    "local": local_command,
    "deepspeed": deepspeed_command,
}


def train_command(run_dir: Path, train: TrainConfig, *, python: str = sys.executable,
                  master_port: int = DEFAULT_MASTER_PORT) -> list[str]:
    """argv that runs the training job of ``run_dir`` with ``train.launcher``.

    ``python``: the interpreter (default: this one). ``master_port``: the deepspeed rendezvous port; pick a
    free one when several jobs may run at once on a host.
    """
    return LAUNCHERS[train.launcher](run_dir, train, python=python, master_port=master_port)
