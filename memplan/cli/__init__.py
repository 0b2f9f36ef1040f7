"""The ``memplan`` command: thin wiring over the library. One parser and one run function per subcommand, in a
module per wing (``plan_cmds``, ``measure_cmds``, ``report_cmds``); flags, choices and defaults of the setup
knobs come from ``memplan.plan.setup.KNOBS``. Exit statuses (the top-level help lists them): 0 done, 1
nothing fits (``fit``, ``estimate --gpu``), 2 bad input with one line on stderr, 130 interrupted."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from importlib import import_module

from memplan.errors import MemplanError

from .common import HEAVY_PACKAGES, Parser

__all__ = ["main", "build_parser"]

# subcommand -> the module that registers it (every module registers all of its commands)
_COMMANDS = {"estimate": "plan_cmds", "fit": "plan_cmds", "models": "plan_cmds", "gpus": "plan_cmds",
             "simulate": "measure_cmds", "profile": "measure_cmds", "validate": "measure_cmds",
             "report": "report_cmds"}


def build_parser(argv: Sequence[str] | None = None) -> Parser:
    """The ``memplan`` parser. Given ``argv`` naming a subcommand, only that subcommand's module is imported
    (``memplan fit`` starts without loading the measurement or report wiring); otherwise all are, for the
    full help and the "invalid choice" message."""
    parser = Parser(
        prog="memplan",
        description="Plan GPU memory for LoRA / QLoRA / full fine-tuning before anything is loaded.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              memplan fit opt-13b --gpu 3090
              memplan fit llama-2-7b --gpu 3060 --seq-len 2048 --bits 4
              memplan estimate opt-13b --rank 16 --targets q_proj,v_proj --batch-size 4 --json
              memplan models
              memplan gpus
              memplan fit --config axolotl.yml --gpu 4090 --free batch_size
              memplan report capacity --format md,html

            exit status:
              0    done; fit found a plan; estimate --gpu: the setup fits
              1    fit: nothing fits; estimate --gpu: the setup does not fit the card
              2    bad input (one line on stderr naming the value and what is allowed)
              130  interrupted (Ctrl-C); profile keeps the finished records and the interrupted one
            """),
    )
    from memplan import __version__

    parser.add_argument("--version", action="version", version=f"memplan {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    first = next((a for a in argv or () if not a.startswith("-")), None)
    modules = [_COMMANDS[first]] if first in _COMMANDS else list(dict.fromkeys(_COMMANDS.values()))
    for name in modules:
        import_module(f".{name}", __name__).add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # (profile --gpus N relaunches itself with them)
    if not getattr(args, "func", None):  # no subcommand: the help is the answer, on stderr (not a result)
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except MemplanError as exc:
        sys.stderr.write(f"{args.prog}: error: {exc}\n")
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in HEAVY_PACKAGES:
            sys.stderr.write(f"{args.prog}: error: this command needs {exc.name.split('.')[0]}, which is "
                             f"not installed; install the measurement stack with: pip install 'memplan[profile]'\n")
            return 2
        raise
    except KeyboardInterrupt:
        sys.stderr.write("memplan: interrupted\n")
        return 130
