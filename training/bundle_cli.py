"""``morphocam-bundle``: carry the datasets and ImageNet weights to the GPU machine, and size what travels.

  morphocam-bundle pack                              # hushem + smids + lite0 -> device_bundle/ (refused over 60 MiB)
  morphocam-bundle pack --datasets smids --weights lite0
  morphocam-bundle unpack --bundle device_bundle     # on the GPU machine: rebuild, verify every pixel hash
  morphocam-bundle tree --carry device_bundle        # what the device tool would send, against its 64 MiB

After unpack, train with ``MORPHOCAM_DATA=<bundle>/datasets MORPHOCAM_WEIGHTS_DIR=<bundle>/weights``: the
data fingerprint, and so the seeded split, is the packing machine's. Each sub-command takes its options
from one dataclass, settable by flags or ``--config file.yaml`` (``morphocam-bundle COMMAND --help``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from morphocam.config import add_options, config_from_args

from .bundle import DEVICE_LIMIT_MIB, MIB, BundleError, PackConfig, UnpackConfig, pack, unpack
from .data import DatasetError
from .tree_size import TreeConfig, measure, repo_root, report


def _pack(cfg: PackConfig) -> int:
    manifest = pack(cfg)
    for name, size in sorted(manifest["parts"].items(), key=lambda kv: -kv[1]):
        print(f"{size / MIB:8.2f} MiB  {name}")
    for name, d in manifest["datasets"].items():
        print(f"{name}: {len(d['images'])} images ({d['source_bytes'] / MIB:.1f} MiB as files), "
              f"fingerprint {d['fingerprint']}")
    print(f"{manifest['total_bytes'] / MIB:8.2f} MiB  {cfg.output_dir} ({manifest['total_bytes']} B, "
          f"budget {cfg.budget_mib:g} MiB)")
    print(_device_call_size(cfg.output_dir, manifest["total_bytes"]))
    return 0


def _device_call_size(bundle: Path, bundle_bytes: int) -> str:
    """The whole device call with the bundle carried: the budget alone does not see the repository."""
    try:
        repo = repo_root()
        inside = bundle.resolve().relative_to(repo.resolve()).as_posix()
    except (OSError, subprocess.CalledProcessError, ValueError):
        return "device call: not measured (no git checkout here, or the bundle lies outside it)"
    result = measure(TreeConfig(repo=repo, carry=(inside,)))
    tree = result["total_bytes"] - bundle_bytes
    return (f"device call with {inside} carried: {result['total_bytes'] / MIB:.1f} MiB (tree {tree / MIB:.1f} MiB "
            f"+ bundle {bundle_bytes / MIB:.1f} MiB) of {DEVICE_LIMIT_MIB} MiB"
            + (": OVER, see 'morphocam-bundle tree'" if result["over"] else ""))


def _unpack(cfg: UnpackConfig) -> int:
    result = unpack(cfg)
    for name, fingerprint in result["fingerprints"].items():
        print(f"{name}: verified, fingerprint {fingerprint}")
    for path in result["weights"]:
        print(f"weights: verified {path}")
    print(json.dumps({"MORPHOCAM_DATA": result["data_root"], "MORPHOCAM_WEIGHTS_DIR": result["weights_dir"]}))
    return 0


def _tree(cfg: TreeConfig) -> int:
    result = measure(cfg)
    print(report(result))
    return 1 if result["over"] else 0


COMMANDS: dict[str, tuple[type, Callable[..., int], str]] = {
    "pack": (PackConfig, _pack, "write the datasets (lossless WebP) and weights files into one bundle folder"),
    "unpack": (UnpackConfig, _unpack, "rebuild the datasets and weights files from a bundle and verify them"),
    "tree": (TreeConfig, _tree, "size what the device tool would send (exit 1 when over its limit)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="morphocam-bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, _, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        add_options(sub, cls)
        sub.set_defaults(subparser=sub)  # a bad option value is reported with the sub-command's usage
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    options = vars(parser.parse_args(argv))
    cls, run, _ = COMMANDS[options.pop("command")]
    cfg = config_from_args(cls, options, options.pop("subparser"))
    try:
        return run(cfg)
    except (BundleError, DatasetError, FileNotFoundError) as exc:
        print(f"morphocam-bundle: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
