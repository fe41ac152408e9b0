"""Command lines from a @dataclass Config. Used by every stage: sft.py, rollout.py, dipo.py
and eval.py through run_stage, attention.py through parse_config.

A field is declared once with flag(default, help, ...): its --kebab-case flag, its --help
line, its type and its valid values come from there, and run_stage checks them all before
the stage runs, so a refused value writes nothing. Precedence: defaults < --config
FILE.json < flags.
"""

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import field
from pathlib import Path


def flag(default, help, choices=None, low=None, above=None, high=None, when=None, positional=False):
    """A Config field. help becomes --help; the value must be one of `choices`, at least `low`,
    more than `above` and at most `high` (a probability: above=0, high=1), and a float must
    be finite. when(cfg) says whether the flag applies (a threshold of another strategy is
    not checked). A positional list field is given without a flag name (eval.py's files)."""
    metadata = dict(
        help=help, choices=choices, low=low, above=above, high=high, when=when, positional=positional
    )
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def allowed_values(m):
    """The values a flag allows, for its --help line."""
    words = [f"one of {', '.join(m['choices'])}"] if m.get("choices") else []
    words += [
        f"{word} {m[key]}"
        for key, word in (("low", ">="), ("above", ">"), ("high", "<="))
        if m.get(key) is not None
    ]
    return "; " + ", ".join(words) if words else ""


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
        help = f"{f.metadata.get('help', '')} (default: {default!r}{allowed_values(f.metadata)})"
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
    """The Config of a command line: defaults, then --config FILE.json, then the flags. A bad
    config file raises ValueError."""
    args = vars(build_parser(config_cls, description).parse_args(argv))
    args.pop("debug")
    config = args.pop("config", None)
    values = read_config(config, config_cls) if config else {}
    values.update(args)
    return config_cls(**values)


TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def read_config(path, config_cls):
    """A --config file: a JSON object whose keys are the Config's fields and whose values have
    their types (an integer where a float is declared is taken). NaN and infinities are not
    JSON and are refused."""

    def not_json(constant):
        raise ValueError(f"{constant} is not JSON")

    try:
        if not Path(path).is_file():
            raise ValueError("not a file")
        with open(path, "rb") as f:
            data = f.read(2**20 + 1)
        if len(data) > 2**20:
            raise ValueError("larger than 1 MB; a config holds flags")
        values = json.loads(data.decode(), parse_constant=not_json)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"--config {path}: {e}") from None
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: {json.dumps(values)[:40]} is not a JSON object of flags")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {unknown}; known: {sorted(fields)}")
    for key, value in values.items():
        kind = fields[key].type
        if not (type(value) is kind or (kind is float and type(value) is int)):
            raise ValueError(f"--config {path}: {key}: {value!r} is not {TYPES.get(kind, kind.__name__)}")
        values[key] = float(value) if kind is float else value
    return values


def check_values(cfg):
    """Every value a flag's declaration allows (flag's choices, low, above, high; floats finite),
    for the flags that apply; else a ValueError naming the flag."""
    for f in dataclasses.fields(cfg):
        m, value, name = f.metadata, getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if m.get("when") and not m["when"](cfg):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} {value}: not a finite number")
        if m.get("choices") and value not in m["choices"]:
            raise ValueError(f"{name} {value!r}: choose from {', '.join(m['choices'])}")
        if m.get("low") is not None and value < m["low"]:
            raise ValueError(f"{name} {value}: must be at least {m['low']}")
        if m.get("above") is not None and value <= m["above"]:
            raise ValueError(f"{name} {value}: must be more than {m['above']}")
        if m.get("high") is not None and value > m["high"]:
            raise ValueError(f"{name} {value}: must be at most {m['high']}")


def run_stage(main, config_cls, description, argv=None):
    """A stage's command line: parse the flags and the config file, check every value, run
    main(cfg) and exit with what it returns. Bad input (a refused value, a missing or malformed
    file, a locked run) ends as one line on stderr, "error: ...", with exit code 1 and nothing
    written; --debug shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = parse_config(config_cls, argv, description)
        check_values(cfg)
        code = main(cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        if "--debug" in argv:
            raise
        if isinstance(e, OSError) and e.filename:  # "FILE: why", not "[Errno 27] why: 'FILE'"
            e = f"{e.filename}: {e.strerror}"
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
        sys.exit(f"error: {message}")
    sys.exit(code or 0)
