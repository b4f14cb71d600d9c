"""Command lines that start the training job; pure functions (the owner runs them and reads stdout).

``local``: one process, ``python -m backend.jobs.train RUN_DIR``.
``deepspeed``: DeepSpeed's own launcher, run as ``python -m deepspeed.launcher.runner`` (the same program
as the ``deepspeed`` script, but tied to this interpreter whatever PATH says) with ``--module
backend.jobs.train``. It starts ``num_processes`` ranks per node (``--num_gpus N``: on a machine without GPUs
the ranks are CPU processes, DeepSpeed's CPU accelerator, gloo) and appends ``--local_rank=N`` to each
rank's argv, which backend.jobs.train accepts and ignores. With a hostfile (MPI style, ``host slots=N``) it
starts ``num_processes`` ranks on every host listed, over pdsh/ssh; prefloop must be installed at the same
path on each host, and the workspace must be on a filesystem every host mounts at the same path (pdsh runs
``cd RUN_DIR`` there, and each rank checks it sees its run folder: ``backend.jobs.common.check_run_dir``).
Multi-node, the owner writes the variables a rank needs to DeepSpeed's env file in the run folder, the
launcher's cwd (``write_rank_env``), and reads the launcher's output through pdsh's ``host: `` prefix
(``event_parser``).

``train.num_processes = "auto"`` is resolved here, once, before the run folder is written
(``resolve_train``): the owner records the resolved number in the job's config.json and launches with it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Protocol

from backend.progress import parse_host_line, parse_line
from core.config import TrainConfig
from core.errors import ConfigError, UsageError

DEFAULT_MASTER_PORT = 29500

log = logging.getLogger(__name__)


def visible_gpus() -> int:
    """CUDA GPUs this process sees (torch honours ``CUDA_VISIBLE_DEVICES``); 0 on CPU or with
    ``PREFLOOP_DEVICE=cpu``."""
    from backend.models import default_device

    if default_device() != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def resolve_num_processes(train: TrainConfig, visible_gpus: int) -> int:
    """Ranks per node for ``train`` on a machine that sees ``visible_gpus`` CUDA GPUs (0 on CPU).

    ``auto``: the GPUs seen (1 on CPU); always 1 with the ``local`` launcher, which runs one process. A
    number above 1 needs the ``deepspeed`` launcher; on a GPU machine it may not exceed the GPUs seen
    (unless a hostfile puts the ranks on other hosts). On CPU a number is kept: the ranks are CPU processes.
    Raises ConfigError naming the key to change.
    """
    n = train.num_processes
    if train.launcher == "local":
        if n != "auto" and n > 1:
            raise ConfigError(f"train.num_processes = {n} needs several processes, and train.launcher = "
                              '"local" runs one: set train.launcher = "deepspeed" (or train.num_processes = 1)')
        if visible_gpus > 1:
            log.info('train.launcher = "local" uses 1 of the %d GPUs seen; train.launcher = "deepspeed" '
                     "uses them all", visible_gpus)
        return 1
    if n == "auto":
        return max(visible_gpus, 1)
    if visible_gpus and n > visible_gpus and not train.hostfile:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else ""
        raise ConfigError(f"train.num_processes = {n} but this machine sees {visible_gpus} CUDA GPU(s){seen}: "
                          f'set train.num_processes = "auto" or a number up to {visible_gpus}')
    return n


def resolve_train(train: TrainConfig, visible: int | None = None) -> TrainConfig:
    """``train`` with ``num_processes`` resolved (``resolve_num_processes``); ``visible``: the GPUs seen,
    counted here when None."""
    n = resolve_num_processes(train, visible_gpus() if visible is None else visible)
    return train.model_copy(update={"num_processes": n, "grad_accum": resolve_grad_accum(train, n)})


def hostfile_names(hostfile: str) -> list[str]:
    """The hosts of an MPI-style hostfile (``host slots=N`` lines; comments and blank lines skipped), in
    order: DeepSpeed gives node rank 0, and so global rank 0, to the first."""
    try:
        lines = Path(hostfile).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UsageError(f"train.hostfile {hostfile}: cannot read it ({err.strerror})") from None
    return [line.split()[0] for line in (raw.split("#", 1)[0].strip() for raw in lines) if line]


def hostfile_hosts(hostfile: str | None) -> int:
    """Hosts in the hostfile (``hostfile_names``), 1 without."""
    return max(1, len(hostfile_names(hostfile))) if hostfile else 1


def resolve_grad_accum(train: TrainConfig, processes: int) -> int:
    """``train.grad_accum``, or global_batch / (batch_size x ranks) when ``train.global_batch`` is set; a
    UsageError naming the numbers when it does not divide evenly."""
    if train.global_batch is None:
        return train.grad_accum
    ranks = processes * hostfile_hosts(train.hostfile) if train.launcher == "deepspeed" else 1
    per_step = train.batch_size * ranks
    if train.global_batch % per_step:
        raise UsageError(f"train.global_batch = {train.global_batch} is not a multiple of train.batch_size "
                         f"({train.batch_size}) x ranks ({ranks}) = {per_step}: change train.global_batch or "
                         "train.batch_size")
    return train.global_batch // per_step


class Launcher(Protocol):
    def __call__(self, run_dir: Path, train: TrainConfig, *, python: str, master_port: int) -> list[str]: ...


def local_command(run_dir: Path, train: TrainConfig, *, python: str, master_port: int) -> list[str]:
    return [python, "-m", "backend.jobs.train", str(run_dir)]


def deepspeed_command(run_dir: Path, train: TrainConfig, *, python: str, master_port: int) -> list[str]:
    cmd = [python, "-m", "deepspeed.launcher.runner"]
    if train.hostfile:  # absolute: the launcher runs in the run folder
        cmd += ["--hostfile", str(Path(train.hostfile).expanduser().absolute())]
    if train.num_processes == "auto":
        raise ValueError('train.num_processes = "auto": resolve it first (backend.launch.resolve_train)')
    cmd += ["--num_gpus", str(train.num_processes), "--master_port", str(master_port),
            "--module", "backend.jobs.train", str(run_dir)]
    return cmd


LAUNCHERS: dict[str, Launcher] = {
    "local": local_command,
    "deepspeed": deepspeed_command,
}


def train_command(run_dir: Path, train: TrainConfig, *, python: str = sys.executable,
                  master_port: int = DEFAULT_MASTER_PORT) -> list[str]:
    """argv that runs the training job of ``run_dir`` with ``train.launcher``; ``train.num_processes``
    already resolved (``resolve_train``).

    ``python``: the interpreter (default: this one). ``master_port``: the deepspeed rendezvous port; pick a
    free one when several jobs may run at once on a host.
    """
    return LAUNCHERS[train.launcher](run_dir, train, python=python, master_port=master_port)


# ---- multi-node: what the owner gives the launcher besides its command line ---------------------------

RANK_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
            "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR",
            "PREFLOOP_DEVICE", "PREFLOOP_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH")
"""The owner's variables a rank on another host needs (the model cache and offline switches, thread and
kernel-cache settings, our own, the import path); written when set. DeepSpeed's runner itself forwards
only variables starting with PYTHON, MLFLOW, MV2, UCX and (on CUDA) NCCL."""
_UNSAFE_VALUE = re.compile(r'[\n"$`\\]')
"""DeepSpeed reads the file as ``KEY=VALUE`` lines and pdsh runs ``export KEY="VALUE"`` in a remote shell."""


def env_file_name(environ: Mapping[str, str] = os.environ) -> str:
    """The env file DeepSpeed's runner reads from its cwd (and from ``~``): ``.deepspeed_env``, or
    ``DS_ENV_FILE`` when set (deepspeed/launcher/runner.py, DEEPSPEED_ENVIRONMENT_NAME)."""
    return environ.get("DS_ENV_FILE", ".deepspeed_env")


def write_rank_env(run_dir: Path, train: TrainConfig, env: Mapping[str, str]) -> Path | None:
    """With a hostfile, write the ``RANK_ENV`` variables set in ``env`` (the job's environment) to
    DeepSpeed's env file in ``run_dir``, the launcher's cwd, whose runner exports them on every host; its
    path, or None (one node: the ranks inherit the launcher's environment). A value the remote shell would
    mangle is left out with a warning."""
    if train.launcher != "deepspeed" or not train.hostfile:
        return None
    lines = []
    for key in RANK_ENV:
        value = env.get(key)
        if not value:
            continue
        if _UNSAFE_VALUE.search(value):
            log.warning("not passing %s to the other hosts: its value has a newline, quote, $, ` or \\", key)
            continue
        lines.append(f"{key}={value}\n")
    path = Path(run_dir) / env_file_name(env)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def event_parser(train: TrainConfig) -> Callable[[str], dict]:
    """How the owner reads the launcher's stdout: with a hostfile every line comes through pdsh as
    ``host: line``, and the events of the hostfile's first host are kept, the others' logged
    (``backend.progress.parse_host_line``); else ``parse_line``. Rank 0 runs on that first host: DeepSpeed
    makes it node rank 0 and takes its address as the master address. pdsh labels a ``user@host`` entry
    with the bare host."""
    if train.launcher == "deepspeed" and train.hostfile:
        return partial(parse_host_line, main_host=hostfile_names(train.hostfile)[0].rsplit("@", 1)[-1])
    return parse_line
