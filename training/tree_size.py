"""What the device tool would send: the working tree's size against its 64 MiB limit.

The tool copies tracked files, untracked files that git does not ignore, a ``shared/`` folder inside the
checkout, and the gitignored paths named in ``carry``. This sums the same set (``git ls-files --cached
--others --exclude-standard``, existing files only, links as links) so that a session learns it is over
the limit before it spends device time, and lists the largest files to say where to cut.
"""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from morphocam.config import option

from .bundle import DEVICE_LIMIT_MIB, MIB


@dataclass
class TreeConfig:
    repo: Optional[Path] = option("repository root (default: the git checkout holding the current folder)", None)
    carry: tuple[str, ...] = option("gitignored paths the run would carry, comma-separated (e.g. device_bundle)", ())
    top: int = option("list this many of the largest files", 15)
    limit_mib: float = option("the device tool's limit on what it sends", float(DEVICE_LIMIT_MIB))

    def __post_init__(self) -> None:
        self.carry = tuple(c for c in self.carry if c)
        if self.top < 0 or self.limit_mib <= 0:
            raise ValueError("top must be >= 0 and limit_mib > 0")


def _git(repo: Path, *args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True).stdout
    return [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]


def repo_root() -> Path:
    """The git checkout holding the current folder (raises CalledProcessError outside one)."""
    return Path(_git(Path.cwd(), "rev-parse", "--show-toplevel")[0].strip())


def _size(path: Path) -> Optional[int]:
    """Bytes that travel for one entry: a regular file's size, a link's own size; None if absent or a folder
    (a submodule travels without its files)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None  # deleted but still tracked
    if os.path.isdir(path) and not os.path.islink(path):
        return None
    return st.st_size


def _walk(folder: Path) -> list[Path]:
    if folder.is_file() or folder.is_symlink():
        return [folder]
    return [Path(d) / f for d, _, names in os.walk(folder) for f in names]


def measure(cfg: TreeConfig) -> dict:
    """Sizes in bytes: total, per kind (tracked, untracked, shared/, each carried path), per top-level
    folder, and the largest files with their kind."""
    repo = Path(cfg.repo) if cfg.repo else repo_root()
    entries: dict[str, tuple[int, str]] = {}  # relative path -> (bytes, kind)
    for kind, args in (("tracked", ("ls-files", "-z", "--cached")),
                       ("untracked", ("ls-files", "-z", "--others", "--exclude-standard"))):
        for rel in _git(repo, *args):
            size = _size(repo / rel)
            if size is not None:
                entries.setdefault(rel, (size, kind))
    extra = [("shared", repo / "shared")] if (repo / "shared").is_dir() else []
    extra += [(f"carry {c}", repo / c) for c in cfg.carry]
    for kind, folder in extra:
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist")
        for path in _walk(folder):
            size = _size(path)
            rel = path.relative_to(repo).as_posix()
            if size is not None:
                entries[rel] = (size, kind)  # a carried path replaces what was there
    by_kind: dict[str, int] = defaultdict(int)
    by_top: dict[str, int] = defaultdict(int)
    for rel, (size, kind) in entries.items():
        by_kind[kind] += size
        by_top[rel.split("/", 1)[0] + ("/" if "/" in rel else "")] += size
    total = sum(by_kind.values())
    largest = sorted(entries.items(), key=lambda kv: -kv[1][0])[:cfg.top]
    return {"repo": str(repo), "files": len(entries), "total_bytes": total,
            "limit_bytes": int(cfg.limit_mib * MIB), "over": total > cfg.limit_mib * MIB,
            "by_kind": dict(by_kind), "by_top_level": dict(sorted(by_top.items(), key=lambda kv: -kv[1])),
            "largest": [{"path": rel, "bytes": size, "kind": kind} for rel, (size, kind) in largest]}


def report(result: dict, top_folders: int = 10) -> str:
    mib = lambda n: f"{n / MIB:8.1f} MiB"  # noqa: E731
    verdict = "OVER the limit" if result["over"] else "within the limit"
    lines = [f"{result['repo']}: {result['files']} files, {mib(result['total_bytes']).strip()} "
             f"({result['total_bytes']} B) would travel; limit {mib(result['limit_bytes']).strip()}: {verdict}",
             "by kind:"]
    lines += [f"  {mib(n)}  {kind}" for kind, n in sorted(result["by_kind"].items(), key=lambda kv: -kv[1])]
    lines.append("largest top-level entries:")
    lines += [f"  {mib(n)}  {name}" for name, n in list(result["by_top_level"].items())[:top_folders]]
    lines.append("largest files:")
    lines += [f"  {mib(f['bytes'])}  {f['path']} ({f['kind']})" for f in result["largest"]]
    return "\n".join(lines)
