"""Preflight checks of a round before any job starts: ``prefloop doctor`` prints them, and ``round start``
runs them and stops on a failure (unless ``--force``).

Each check returns a ``Check``: ok / warn / fail, what was found, and the fix. The checks read configs,
processors and the database; no weights are loaded (model sizes are counted on the meta device).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend import launch, memory
from core.config import WorkspaceConfig
from core.errors import PrefloopError

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table."""

    name: str
    status: str
    """ok, warn, fail or skip."""
    found: str
    """What was found."""
    fix: str = ""
    """What to do about a warn or fail."""


@dataclass
class Context:
    """What the checks look at."""

    config: WorkspaceConfig
    """The resolved config of the run (recipe, prefloop.toml, overrides)."""
    root: Path
    """The workspace folder."""
    policy_path: str
    """The folder (or hub id) of the policy the round trains from."""
    longest_pair: int | None = None
    """The round's longest measured pair, when its pairs exist."""
    too_long: int = 0
    """Pairs over train.max_length."""
    pairs: int = 0
    """The round's pairs."""
    gpus: int | None = None
    """CUDA GPUs seen (None: count them)."""
    gpu_bytes: int | None = None
    """Memory of the smallest visible GPU (None: read it)."""
    estimate_on_cpu: bool = True
    """Estimate GPU memory even without a GPU (the doctor command does; round start skips it on CPU)."""
    judge_inputs: list[dict] | None = None
    """The prompts a judge step of the round sees (``storage.judge_usage.judge_inputs``); None: not
    counted."""
    judge_measured: dict | None = None
    """Tokens of the gemini replies already stored (``storage.judge_usage.measured_tokens``)."""
    _shape: memory.ModelShape | None = None

    def policy_shape(self) -> memory.ModelShape:
        """The policy's shape (``memory.shape_of``, counted once for all checks); raises what loading raises."""
        if self._shape is None:
            from transformers import AutoConfig

            self._shape = memory.shape_of(AutoConfig.from_pretrained(self.policy_path))
        return self._shape


def _model(path: str, what: str) -> tuple[Check, object | None]:
    from transformers import AutoConfig

    from backend.families import family_of
    from backend.models import load_processor

    try:
        config = AutoConfig.from_pretrained(path)
        family = family_of(config)
        processor = load_processor(path)
    except (PrefloopError, OSError, ValueError) as err:
        return Check(what, FAIL, f"{path}: {err}", "set the model in prefloop.toml to a supported model "
                     "(see the README's model table) that is in the local Hugging Face cache or a folder"), None
    return Check(what, OK, f"{path}: {family.title}, {type(processor).__name__}"), config


def _runs_judge(cfg: WorkspaceConfig, name: str) -> bool:
    """Whether a step of the run calls judge ``name``: the judge step runs judges.default, the eval step
    round.eval_judge (pairs.judge only reads scores already stored)."""
    return name in cfg.judges.default or cfg.round.eval_judge == name


def check_policy(ctx: Context) -> Check:
    return _model(ctx.policy_path, "policy loads")[0]


def check_critic(ctx: Context) -> Check:
    cfg = ctx.config
    used = _runs_judge(cfg, "critic")
    if not used:
        return Check("critic loads", SKIP, "no step of this run uses the critic judge")
    from backend.steps.judge import critic_model_path

    try:
        path = critic_model_path(ctx.root, cfg.judges.critic.model)
    except PrefloopError as err:
        return Check("critic loads", FAIL, str(err), "set judges.critic.model to a model this machine has")
    return _model(path, "critic loads")[0]


def check_gpus(ctx: Context) -> Check:
    gpus = launch.visible_gpus() if ctx.gpus is None else ctx.gpus
    train = ctx.config.train
    try:
        n = launch.resolve_num_processes(train, gpus)
    except PrefloopError as err:
        return Check("GPUs", FAIL, f"{gpus} CUDA GPU(s) seen", str(err))
    if gpus == 0:
        return Check("GPUs", WARN, f"no CUDA GPU seen: {n} CPU process(es) train", "fine for tiny models; a 7B "
                     "model needs GPUs and a CUDA build of torch (README, GPU set-up)")
    return Check("GPUs", OK, f"{gpus} CUDA GPU(s) seen, {n} rank(s) per node ({train.launcher} launcher)")


def run_plan(ctx: Context, seq_len: int) -> memory.RunPlan:
    train = ctx.config.train
    gpus = launch.visible_gpus() if ctx.gpus is None else ctx.gpus
    ranks = launch.resolve_num_processes(train, gpus) if train.launcher == "deepspeed" else 1
    return memory.RunPlan(lora=train.lora, lora_r=train.lora_r, train_projector=train.train_projector,
                          zero_stage=train.zero_stage if train.launcher == "deepspeed" else 2,
                          gpus_per_node=ranks, nodes=launch.hostfile_hosts(train.hostfile),
                          micro_batch=train.batch_size, seq_len=seq_len,
                          gradient_checkpointing=train.gradient_checkpointing)


def check_memory(ctx: Context) -> Check:
    gpus = launch.visible_gpus() if ctx.gpus is None else ctx.gpus
    if gpus == 0 and not ctx.estimate_on_cpu:
        return Check("GPU memory", SKIP, "no GPU: the run trains on CPU")
    try:
        shape = ctx.policy_shape()
    except (PrefloopError, OSError, ValueError) as err:
        return Check("GPU memory", WARN, f"cannot count the policy's parameters: {err}")
    limit = ctx.config.train.max_length
    seq_len = ctx.longest_pair or (limit if isinstance(limit, int) else 2048)
    plan = run_plan(ctx, seq_len)
    est = memory.estimate(shape, plan)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in est.parts_gib().items() if v >= 0.05)
    found = (f"~{est.gib()} GiB per GPU ({parts}) for {count(shape.total_params)} parameters, "
             f"{count(est.trainable_params)} trainable, micro-batch {plan.micro_batch} x {seq_len} tokens, "
             f"ZeRO-{plan.zero_stage} over {plan.gpus_per_node * plan.nodes} GPU(s)")
    have = ctx.gpu_bytes if ctx.gpu_bytes is not None else _smallest_gpu()
    if not have:
        return Check("GPU memory", WARN if gpus == 0 else OK, found + "; no GPU to compare with")
    if est.total > have:
        return Check("GPU memory", FAIL, f"{found}; the smallest GPU has {have / memory.GIB:.0f} GiB",
                     "more GPUs (train.num_processes) with ZeRO-3, LoRA (train.lora), a smaller train.batch_size, "
                     "train.gradient_checkpointing = true, or shorter pairs (policy.image_processor)")
    return Check("GPU memory", OK, f"{found}; the smallest GPU has {have / memory.GIB:.0f} GiB")


def count(n: int) -> str:
    """1234567 -> "1.23M"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _smallest_gpu() -> int:
    import torch

    if not torch.cuda.is_available():
        return 0
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def check_lengths(ctx: Context) -> Check:
    limit = ctx.config.train.max_length
    if not ctx.pairs:
        return Check("pair lengths", SKIP, "the round has no pairs yet (the pairs step measures them)")
    if ctx.longest_pair is None:
        return Check("pair lengths", WARN, "the pairs could not be measured", "check the policy's processor")
    found = f"longest pair {ctx.longest_pair} tokens, train.max_length = {limit}"
    if ctx.too_long == ctx.pairs:
        return Check("pair lengths", FAIL, f"{found}: every pair is longer", 'set train.max_length = "auto"')
    if ctx.too_long:
        return Check("pair lengths", WARN, f"{found}: {ctx.too_long} of {ctx.pairs} pairs are longer and will be "
                     "skipped", 'set train.max_length = "auto" (or higher)')
    return Check("pair lengths", OK, found)


def check_gemini_key(ctx: Context) -> Check:
    cfg = ctx.config
    used = _runs_judge(cfg, "gemini")
    if not used:
        return Check("Gemini key", SKIP, "no step of this run uses the gemini judge")
    if os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY"):
        return Check("Gemini key", OK, "GEMINI_API_KEY / GOOGLE_API_KEY is set")
    return Check("Gemini key", FAIL, "the gemini judge runs but no API key is in the environment",
                 "export GEMINI_API_KEY=... (never in prefloop.toml)")


def check_judge_cost(ctx: Context) -> Check:
    cfg = ctx.config
    used = _runs_judge(cfg, "gemini")
    if not used:
        return Check("judge cost", SKIP, "no step of this run uses the gemini judge")
    if ctx.judge_inputs is None:
        return Check("judge cost", SKIP, "the round's prompts were not counted")
    from annotators.gemini_cost import estimate, usd

    g = cfg.judges.gemini
    est = estimate(ctx.judge_inputs, g, cfg.generation, ctx.judge_measured)
    return Check("judge cost", OK, f"gemini judge step (judges.gemini.mode = {g.mode}): {est.prompts} "
                 f"prompts, ~{count(est.tokens_in)} input + ~{count(est.tokens_out)} output tokens (output: "
                 f"{est.output_basis}); online ~{usd(est.online_usd)}, batch ~{usd(est.batch_usd)} at {g.model}'s prices in "
                 "judges.gemini (check them against Google's price page)")


def check_disk(ctx: Context) -> Check:
    free = shutil.disk_usage(ctx.root).free
    try:
        params = ctx.policy_shape().total_params
    except (PrefloopError, OSError, ValueError):
        return Check("disk space", OK if free > 50 * memory.GIB else WARN, f"{free / memory.GIB:.0f} GiB free")
    bytes_per = 2 if ctx.config.policy.dtype in ("auto", "bfloat16", "float16") else 4
    need = params * bytes_per * (2 if ctx.config.train.lora and ctx.config.train.merge else 1)
    found = f"{free / memory.GIB:.1f} GiB free in {ctx.root}; a checkpoint needs ~{need / memory.GIB:.1f} GiB"
    if free < need:
        return Check("disk space", FAIL, found, "free space, or move the workspace to a larger disk")
    if free < 3 * need:
        return Check("disk space", WARN, found + " (fewer than 3 rounds' worth)", "free space before long runs")
    return Check("disk space", OK, found)


def check_nodes(ctx: Context) -> Check:
    hostfile = ctx.config.train.hostfile
    if not hostfile:
        return Check("workspace on every node", SKIP, "one node")
    hosts = launch.hostfile_hosts(hostfile)
    return Check("workspace on every node", WARN, f"{hosts} hosts in {hostfile}; each rank checks that it sees "
                 f"{ctx.root} at start", "put the workspace on a filesystem every node mounts at the same path")


CHECKS: dict[str, Callable[[Context], Check]] = {
    "policy": check_policy, "critic": check_critic, "gpus": check_gpus, "memory": check_memory,
    "lengths": check_lengths, "gemini_key": check_gemini_key, "judge_cost": check_judge_cost,
    "disk": check_disk, "nodes": check_nodes,
}
"""name -> check, in the order printed."""


def run_checks(ctx: Context) -> list[Check]:
    return [check(ctx) for check in CHECKS.values()]


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == FAIL]


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():<5} {c.name:<{width}}  {c.found}")
        if c.fix and c.status in (WARN, FAIL):
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)


def context_for(ws, config: WorkspaceConfig | None = None, *, estimate_on_cpu: bool = True) -> Context:
    """The checks' context for the workspace's current round, with ``config`` (default: the workspace's)."""
    from backend.steps.common import checkpoint_path
    from backend.steps.pairs import measure
    from backend.token_budget import Budget
    from storage import pairs as pairstore
    from storage import rounds

    config = config or ws.config
    rnd = rounds.current_round(ws.cursor())
    policy = str(checkpoint_path(ws, rnd["policy_checkpoint_id"]))
    ctx = Context(config=config, root=ws.root, policy_path=policy, estimate_on_cpu=estimate_on_cpu,
                  pairs=pairstore.count(ws.cursor(), rnd["round_id"]))
    if ctx.pairs:
        budget = measure(ws, rnd["round_id"], rnd["policy_checkpoint_id"], config.train,
                         config.policy.image_processor)
        if isinstance(budget, Budget):
            ctx.longest_pair, ctx.too_long = budget.longest, budget.too_long
    if _runs_judge(config, "gemini"):
        from storage import judge_usage

        ctx.judge_inputs = judge_usage.judge_inputs(ws.cursor(), rnd["round_id"])
        ctx.judge_measured = judge_usage.measured_tokens(ws.cursor(), "gemini")
    return ctx
