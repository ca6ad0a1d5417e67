"""Typed configuration plumbing shared by every console script.

Each command declares one dataclass; :func:`build_parser` turns its fields into ``--flags`` (names
with dashes, help from the field metadata), :func:`parse_config` layers defaults < YAML file <
flags, and :func:`save_config` writes the resolved values beside the stage's output.

Per-field CLI details ride in the field's metadata (see :func:`option`): a positional argument, a
flag name other than the field's, a repeatable flag, an on/off switch, a required option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

T = TypeVar("T")

# option() keywords that describe the command line rather than the dataclass field
CLI_KEYS = ("flag", "aliases", "positional", "nargs", "repeat", "switch", "required", "metavar", "choices")


def option(help_text: str, default: Any = None, **kw: Any) -> Any:
    """A dataclass field carrying its ``--help`` text; list/dict defaults get a fresh copy per instance.

    CLI keywords: ``flag="--url"`` (flag name, default ``--<field-name>``), ``aliases=("-o",)``,
    ``positional=True`` with ``nargs``, ``repeat=True`` (the flag may be given several times, values
    accumulate), ``switch=True`` (a bool given as ``--x`` / ``--no-x``), ``required=True`` (after the
    YAML file and the flags are merged), ``metavar``, ``choices``.
    """
    meta = {"help": help_text, **{k: kw.pop(k) for k in CLI_KEYS if k in kw}}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


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


class _Extend(argparse.Action):
    """A repeatable flag: every occurrence adds its (comma-separated) values; the default is replaced."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items += list(values) if isinstance(values, (list, tuple)) else [values]
        setattr(namespace, self.dest, items)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the command's docstring as written (its usage examples)."""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_options(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add ``--config`` and one argument per field of ``cls`` to ``parser`` (a parser or sub-parser)."""
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file with any of the options below (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = _default(f)
        text = meta.get("help", "")
        if meta.get("required"):
            text += " (required)"
        elif "default:" not in text:  # a help text that explains its default keeps its own wording
            shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
            text += f" (default: {shown})"
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=text)
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            parser.add_argument(f.name, type=_converter(_item_type(hints[f.name])), nargs=meta.get("nargs"),
                                metavar=meta.get("metavar", f.name.upper()), default=argparse.SUPPRESS,
                                help=meta.get("help", ""))
            continue
        names = [meta.get("flag", f"--{f.name.replace('_', '-')}"), *meta.get("aliases", ())]
        if meta.get("switch"):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if meta.get("repeat"):
            kwargs["action"] = _Extend
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
            hint = _item_type(hints[f.name])
        else:
            hint = hints[f.name]
        parser.add_argument(*names, dest=f.name, type=_converter(hint),
                            metavar=meta.get("metavar", names[0].lstrip("-").replace("-", "_").upper()), **kwargs)
    return parser


def _item_type(tp: Any) -> Any:
    """For a list/tuple field filled by several arguments (nargs): the type of one argument."""
    base, _ = _base_type(tp)
    if typing.get_origin(base) in (tuple, list):
        return typing.get_args(base)[0]
    return base


def build_parser(cls: type, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    return add_options(parser, cls)


def config_from_args(cls: type[T], ns: argparse.Namespace | dict, parser: argparse.ArgumentParser) -> T:
    """The dataclass from parsed arguments: defaults < the ``--config`` YAML file < flags.

    Problems (unknown YAML keys, a missing required option, a value the dataclass rejects) end in
    ``parser.error``: usage and the reason on stderr, exit status 2.
    """
    ns = dict(vars(ns) if isinstance(ns, argparse.Namespace) else ns)
    values: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if config_file is not None:
        import yaml

        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        unknown = set(loaded) - set(fields)
        if unknown:
            parser.error(f"{config_file}: unknown options {sorted(unknown)}")
        hints = typing.get_type_hints(cls)
        for key, value in loaded.items():
            values[key] = _converter(hints[key])(str(value)) if isinstance(value, str) else value
    values.update({k: v for k, v in ns.items() if k in fields})
    missing = [f for name, f in fields.items() if f.metadata.get("required") and values.get(name) is None]
    if missing:
        parser.error("the following arguments are required: "
                     + ", ".join(f.metadata.get("flag", f"--{f.name.replace('_', '-')}") for f in missing))
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def parse_config(cls: type[T], argv: Sequence[str] | None, description: str, prog: str | None = None) -> T:
    parser = build_parser(cls, description, prog)
    return config_from_args(cls, parser.parse_args(argv), parser)


def config_to_dict(cfg: Any) -> dict:
    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]  # a tuple of paths too: YAML and JSON take neither
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def dumps(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)
