"""Command lines from a @dataclass Config. Used by every stage: sft.py, rollout.py, dipo.py
and eval.py through run_stage, attention.py through parse_config.

A field is declared once with flag(default, help, choices=...): its --kebab-case flag, its
--help line and its check come from there. Precedence: defaults < --config FILE.json < flags.
"""

import argparse
import dataclasses
import json
import sys
from dataclasses import field
from pathlib import Path


def flag(default, help, choices=None, positional=False):
    """A Config field: its help text becomes --help, `choices` the values it accepts, and a
    positional list field is given without a flag name (eval.py's files)."""
    metadata = {"help": help, "choices": choices, "positional": positional}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def build_parser(config_cls, description):
    """One --kebab-case flag per field (booleans as --x/--no-x, lists as nargs="*"), plus
    --config FILE.json and --debug."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        metavar="FILE.json",
        help="JSON object with any of the fields below (snake_case); flags given on the command line win",
    )
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f"{f.metadata.get('help', '')} (default: {default!r})"
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+", help=f.metadata.get("help", ""))
            continue
        name = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(
                name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help
            )
        elif isinstance(default, list):
            kind = type(default[0]) if default else str
            parser.add_argument(name, nargs="*", type=kind, default=argparse.SUPPRESS, help=help)
        else:
            kind = f.type if f.type in (int, float, str) else str
            parser.add_argument(name, type=kind, default=argparse.SUPPRESS, help=help)
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback, not one line")
    return parser


def parse_config(config_cls, argv=None, description=None):
    """The Config of a command line: defaults, then --config FILE.json, then the flags."""
    parser = build_parser(config_cls, description)
    args = vars(parser.parse_args(argv))
    args.pop("debug")
    values = {}
    if args.get("config"):
        path = Path(args.pop("config"))
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--config {path}: {e}")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - known)
        if not isinstance(values, dict) or unknown:
            parser.error(f"--config {path}: unknown keys {unknown}; known: {sorted(known)}")
    args.pop("config", None)
    values.update(args)
    return config_cls(**values)


def check_choices(cfg):
    """Every field declared with choices holds one of them; else a ValueError naming the flag."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and value not in choices:
            raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: choose from {', '.join(choices)}")


def run_stage(main, config_cls, description, argv=None):
    """A stage's command line: parse the flags, check the choices, run main(cfg) and exit with
    what it returns. Bad input (a missing or malformed file, a refused flag, a locked run) ends
    as one line on stderr, "error: ...", with exit code 1 and nothing written; --debug shows
    the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(config_cls, argv, description)
    try:
        check_choices(cfg)
        code = main(cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        if "--debug" in argv:
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
        sys.exit(f"error: {message}")
    sys.exit(code or 0)
