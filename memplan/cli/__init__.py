"""The ``memplan`` command: thin wiring over the library. One parser and one run function per subcommand, in a
module per wing (``plan_cmds``, ``measure_cmds``, ``report_cmds``); flags, choices and defaults of the setup
knobs come from ``memplan.plan.setup.KNOBS``. Bad input exits 2 with one line on stderr; ``fit`` exits 1 when
nothing fits."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from memplan.errors import MemplanError

from . import measure_cmds, plan_cmds, report_cmds
from .common import HEAVY_PACKAGES, Parser

__all__ = ["main", "build_parser"]


def build_parser() -> Parser:
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
            """),
    )
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    plan_cmds.add_parsers(sub)
    measure_cmds.add_parsers(sub)
    report_cmds.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except MemplanError as exc:
        sys.stderr.write(f"memplan {args.command}: error: {exc}\n")
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in HEAVY_PACKAGES:
            sys.stderr.write(f"memplan {args.command}: error: this command needs {exc.name.split('.')[0]}, which is "
                             f"not installed; install the measurement stack with: pip install 'memplan[profile]'\n")
            return 2
        raise
    except KeyboardInterrupt:
        sys.stderr.write("memplan: interrupted\n")
        return 130
