"""What every subcommand shares: the one-line-error parser, the setup flags (built from
``memplan.plan.setup.KNOBS``: their values, defaults and help live there), ``--config`` merging, output."""

from __future__ import annotations

import argparse
import json
import sys

from memplan.plan.knobs import KNOBS

__all__ = ["Parser", "HEAVY_PACKAGES", "add_knobs", "add_config_args", "setup_from_args", "setup_with_configs",
           "print_config", "console", "print_json"]

# What simulate / profile / validate / report import lazily (the `profile` and `report` extras).
HEAVY_PACKAGES = frozenset({"torch", "transformers", "peft", "bitsandbytes", "accelerate", "pynvml", "matplotlib",
                            "pandas"})


class _Once(argparse.Action):
    """Store an option's value, refusing a second one: ``--gpu 3090 --gpu 4090`` is a mistake, not a choice."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in given:
            before = getattr(namespace, self.dest)
            parser.error(f"{option_string} given twice ({before!r} and {values!r}); give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2, and refuses a single-valued option
    given twice."""

    def add_argument(self, *args, **kwargs):
        if kwargs.get("action") in (None, "store") and args and args[0].startswith("-"):
            kwargs["action"] = _Once
        return super().add_argument(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # the innermost parser finishes first: "memplan report capacity" names an error, not "memplan report"
        namespace, rest = super().parse_known_args(args, namespace)
        if getattr(namespace, "prog", None) is None:
            namespace.prog = self.prog
        return namespace, rest

    def error(self, message: str):  # noqa: D401 - argparse API
        # prog is "memplan fit" or "memplan report capacity": name the whole command
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_knobs(p: argparse.ArgumentParser, *, searched: bool = False) -> None:
    """The setup flags. ``searched``: ``fit``'s help, which says which knobs it searches instead of showing a
    default it does not use."""
    g = p.add_argument_group("training setup")
    for knob in KNOBS:
        kw: dict = {"dest": knob.field, "default": None}
        if searched and knob.searched:
            kw["help"] = f"{knob.help} (searched unless given)"
        else:
            kw["help"] = knob.help_text()
        if knob.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["action"] = _Once  # an argument group's add_argument is not the parser's
            kw["type"] = _gpu_count if (searched and knob.field == "gpus") else knob.kind
            if knob.choices is not None:
                kw["choices"] = list(knob.choices)
        g.add_argument(knob.flag, **kw)
    p.add_argument("--profiles", metavar="DIR", help="catalog folder (default: MEMPLAN_PROFILES or the bundled one)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _gpu_count(text: str):
    """fit's ``--gpus``: a count, or ``auto`` (the fewest cards that fit)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid GPU count {text!r}; give an integer >= 1 or auto") from None


def _flags(args: argparse.Namespace) -> dict:
    return {knob.field: getattr(args, knob.field) for knob in KNOBS}


def setup_from_args(args: argparse.Namespace):
    """A ``TrainSetup`` from the flags, and the set of fields the user gave (pinned)."""
    from memplan.plan.setup import TrainSetup

    given = {k: v for k, v in _flags(args).items() if v is not None}
    return TrainSetup(model=args.model, gpu=getattr(args, "gpu", None), **given), frozenset(given)


def add_config_args(p: argparse.ArgumentParser, *, fit: bool = False) -> None:
    """estimate / fit: ``--model`` and ``--config FILE`` (training configs users already have)."""
    p.add_argument("--model", dest="model_opt", metavar="NAME", help="the model, when not given as MODEL")
    p.add_argument("--config", dest="configs", action="append", metavar="FILE",
                   help="a training config to plan from (repeatable; later files and then flags win): "
                        "TrainingArguments / TRL SFTConfig JSON, peft adapter_config.json, BitsAndBytesConfig "
                        "JSON, axolotl or TRL YAML")
    if fit:
        p.add_argument("--free", metavar="FIELDS",
                       help="comma-separated knobs a --config sets that the search may change "
                            "(e.g. batch_size,grad_ckpt,optimizer)")


def setup_with_configs(args: argparse.Namespace):
    """estimate / fit: (setup, pinned, report) from MODEL / --model, the --config files and the flags;
    ``report`` is None without --config. Files then flags, later wins (``merge_layers``); ``--free`` unpins
    what files set."""
    flags = _flags(args)
    if not args.configs:  # the common case needs no config machinery
        given = {k: v for k, v in flags.items() if v is not None}
        model = args.model or args.model_opt
        if model is None:
            from memplan.errors import NoModelError

            raise NoModelError()
        from memplan.plan.setup import TrainSetup

        if getattr(args, "free", None):
            _free_fields(args.free, flags)  # validates the names
        return TrainSetup(model=model, gpu=getattr(args, "gpu", None), **given), frozenset(given), None

    from memplan.integrations.training_configs import load_training_config, merge_configs

    configs = [load_training_config(path) for path in args.configs]
    setup, pinned, report = merge_configs(configs, {**flags, "gpu": getattr(args, "gpu", None)},
                                          model=args.model or args.model_opt)
    if getattr(args, "free", None):
        pinned -= _free_fields(args.free, flags)
    if report.model_source:  # say where a model name that does not resolve came from
        from memplan.catalog.models import load_model
        from memplan.errors import UnknownModelError

        try:
            load_model(setup.model, profiles_dir=args.profiles)
        except UnknownModelError as exc:
            raise UnknownModelError(f"{exc} (named in {report.model_source}; give MODEL or --model to plan "
                                    f"another)") from None
    return setup, pinned, report


def _free_fields(text: str, flags: dict) -> frozenset[str]:
    """``--free``: knob names (``batch_size`` or ``batch-size``); bits and method are freed together."""
    from memplan.errors import InvalidSetupError, suggestion_suffix

    by_name = {k.field: k.field for k in KNOBS} | {k.flag[2:]: k.field for k in KNOBS}
    free = set()
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in by_name:
            raise InvalidSetupError(f"unknown field {name!r} in --free{suggestion_suffix(name, by_name)}; allowed: "
                                    f"{', '.join(k.field for k in KNOBS)}")
        field = by_name[name]
        if flags.get(field) is not None:
            raise InvalidSetupError(f"--free {name} contradicts the flag that pins it ({field}={flags[field]})")
        free.add(field)
    if free & {"bits", "method"}:
        free |= {"bits", "method"}  # the search picks the method from the bits (4 -> qlora)
    return frozenset(free)


def print_config(out, report) -> None:
    """One line per config file (what it set), then its warnings (yellow) and notes (dim)."""
    from rich.text import Text

    styles = {"used": "", "warning": "yellow", "note": "dim"}
    for kind, line in report.lines():
        out.print(Text(line, style=styles[kind]))


def console():
    from rich.console import Console

    return Console(highlight=False)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def spinner(text: str):
    """A spinner with ``text`` on stderr while the block runs, when stderr is a terminal (stdout, and --json,
    stay clean; a pipe or a log file gets nothing)."""
    from contextlib import nullcontext

    if not sys.stderr.isatty():
        return nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)


class ProgressBar:
    """A progress bar on stderr while the block runs, when stderr is a terminal; ``update(done, total, text)``
    moves it (a no-op otherwise)."""

    def __init__(self, text: str):
        self.text, self._bar, self._task = text, None, None

    def __enter__(self) -> ProgressBar:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.text, total=None)
        return self

    def update(self, done: int, total: int, text: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, description=text or self.text)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
