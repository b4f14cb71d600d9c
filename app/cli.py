"""The ``prefloop`` command line.

Commands are a plain registry: name -> (module, one-line help). Each command module defines
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their command runs,
so ``prefloop --help`` stays fast (no torch import). Errors of our own types print as one red line and
exit with the error's code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from core.errors import PrefloopError, WorkspaceInUse

# name -> (module, one-line description). Keep README's command table in sync (tests check it).
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("app.commands.init", "create a workspace folder (config, database, image store)"),
    "demo": ("app.commands.demo", "build a demo workspace of real photos with scored answers and start the studio"),
    "import": ("app.commands.import_", "import prompts (JSONL, image folder, Parquet) with optional candidates"),
    "export": ("app.commands.export", "export read-only SQL results or preference pairs (TRL / LLaVA format)"),
    "snapshot": ("app.commands.snapshot", "write a consistent copy of the database for notebooks and tools"),
    "status": ("app.commands.status", "show the workspace: model, counts per table, rounds, owner"),
    "doctor": ("app.commands.doctor", "preflight checks of the next round: models, GPUs, memory estimate, keys, disk"),
    "generate": ("app.commands.generate", "sample k candidate answers per prompt from the policy checkpoint"),
    "pairs": ("app.commands.pairs", "build the round's chosen/rejected pairs with a pair strategy"),
    "sft": ("app.commands.sft", ("supervised fine-tuning on the round's best answers (train --method sft); "
                                 "--projector-only for LLaVA's stage-1 alignment")),
    "train": ("app.commands.train", "train one round on the frozen pairs: DPO, or the sft / steerlm baselines"),
    "serve": ("app.commands.serve", "run the review studio (Gradio app with login) as the workspace's owner"),
    "users": ("app.commands.users", "manage studio users: users add|list|passwd|remove|role"),
    "round": ("app.commands.round", "run the loop: round start|resume|status|cancel (pairs, train, eval, generate, judge)"),
    "judge": ("app.commands.judge", "score the round's candidates with a judge (gemini, critic, reference)"),
    "agreement": ("app.commands.agreement", "how far judges agree with each other and with human labels"),
}

NO_WORKSPACE_FLAG = {"init", "demo"}


def _add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("-w", "--workspace", default=os.environ.get("PREFLOOP_WORKSPACE", "."),
                   help="workspace folder (default: $PREFLOOP_WORKSPACE or the current directory)")


def build_parser(load_commands: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefloop",
        description="Annotation and review studio with a training backend for iterative DPO of VLMs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (modname, help_) in COMMANDS.items():
        # Without the command's own arguments (load_commands=False) the pre-parser must not answer -h:
        # main() hands -h on to the full parser of that one command.
        p = sub.add_parser(name, help=help_, description=help_, add_help=load_commands)
        if name not in NO_WORKSPACE_FLAG:
            _add_workspace(p)
        if load_commands:
            importlib.import_module(modname).add_arguments(p)
    return parser


def _red(text: str) -> str:
    return f"\033[31m{text}\033[0m" if sys.stderr.isatty() else text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Parse the command name first so only that command's module is imported.
    pre = build_parser(load_commands=False)
    known, _ = pre.parse_known_args(argv) if argv and argv[0] in COMMANDS else (None, None)
    if known is None:
        pre.parse_args(argv)  # prints help / usage errors and exits
        return 2
    modname = COMMANDS[known.command][0]
    module = importlib.import_module(modname)
    parser = argparse.ArgumentParser(prog=f"prefloop {known.command}", description=COMMANDS[known.command][1])
    if known.command not in NO_WORKSPACE_FLAG:
        _add_workspace(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.command = known.command
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except WorkspaceInUse as err:
        # While `prefloop serve` owns the workspace, the lead's commands run inside it (app/forward.py).
        from app.forward import forward

        code = forward(argv, args)
        if code is not None:
            return code
        print(_red(f"prefloop {known.command}: {err}"), file=sys.stderr)
        return err.exit_code
    except PrefloopError as err:
        print(_red(f"prefloop {known.command}: {err}"), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(_red(f"prefloop {known.command}: interrupted"), file=sys.stderr)
        return 130
    finally:
        # Collect reference cycles (tracebacks holding DuckDB cursors) while DuckDB is still loaded;
        # left to interpreter shutdown they make nanobind print leak warnings.
        import gc

        gc.collect()


if __name__ == "__main__":
    sys.exit(main())
