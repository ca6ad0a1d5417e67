"""Typed configuration plumbing shared by every stage's CLI.

Each stage declares one dataclass; :func:`build_parser` turns its fields into ``--flags`` (names
with dashes, help from the field metadata), :func:`parse_config` layers defaults < YAML file <
flags, and :func:`save_config` writes the resolved values beside the stage's output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def option(help_text: str, default: Any = None, **kw: Any) -> Any:
    """A dataclass field carrying its ``--help`` text; list/dict defaults get a fresh copy per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help_text}, **kw)
    return dataclasses.field(default=default, metadata={"help": help_text}, **kw)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional[...]: returns (type, optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any):
    base, optional = _base_type(tp)
    origin = typing.get_origin(base)

    def conv(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        if base is Path:
            return Path(text)
        if origin in (tuple, list):
            inner = typing.get_args(base)[0]
            items = [inner(v) for v in text.split(",") if v]
            return tuple(items) if origin is tuple else items
        return base(text)

    return conv


def build_parser(cls: type, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file with any of the options below (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_converter(hints[f.name]),
                            default=argparse.SUPPRESS, metavar=f.name.upper(),
                            help=f"{f.metadata.get('help', '')} (default: {default})")
    return parser


def parse_config(cls: type[T], argv: list[str] | None, description: str, prog: str | None = None) -> T:
    parser = build_parser(cls, description, prog)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    if config_file is not None:
        import yaml

        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(loaded) - names
        if unknown:
            parser.error(f"{config_file}: unknown options {sorted(unknown)}")
        hints = typing.get_type_hints(cls)
        for key, value in loaded.items():
            values[key] = _converter(hints[key])(str(value)) if isinstance(value, str) else value
    values.update(ns)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def config_to_dict(cfg: Any) -> dict:
    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return list(v)
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def dumps(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)
