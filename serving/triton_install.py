"""Where the ``nvidia-pytriton`` wheel keeps Triton's pieces, and the environment its server needs.

The wheel bundles a real ``tritonserver`` (2.51), ``libtritonserver`` and the Python backend, but no
ONNX Runtime backend (:mod:`.backend_build` compiles Triton's own, linked in as ``onnxruntime/``).
What the binary needs on a CPU box (see ``../shared/NOTES.md``):

- a backend directory holding ``python/`` = ``libtriton_python.so`` + ``triton_python_backend_utils.py``
  + the stub for this interpreter's version (assembled once, as symlinks, in a cache folder);
- ``LD_LIBRARY_PATH`` = the wheel's ``nvidia_pytriton.libs`` (libtritonserver, libcudart stubs...)
  followed by this interpreter's ``LIBDIR`` (else the stub picks the system libpython);
- ``PATH`` starting with this environment's ``bin``: the stub's embedded interpreter finds its
  prefix, hence its site-packages (numpy, onnxruntime, torch...), through the ``python3`` on ``PATH``.

The stub's interpreter runs *isolated* (``sys.flags.isolated``: ``PYTHONPATH`` is ignored), with the
server's working directory and the model's version folder on ``sys.path``. Nothing here adds the
project: every model folder carries the code it runs (see ``serving/triton_models/``), as it must in
a stock NGC Triton container. ``stub_python`` picks another environment (a venv of the same Python
minor version) for the stubs, e.g. one with the models' packages but without the project.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ServerStartError

PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"


def default_cache_root() -> Path:
    return Path(os.environ.get("MORPHOCAM_CACHE", Path.home() / ".cache" / "morphocam"))


@dataclass(frozen=True)
class TritonInstall:
    """Paths of the wheel's pieces; :meth:`find` checks that each one exists."""

    binary: Path
    python_backend: Path  # folder with libtriton_python.so + triton_python_backend_utils.py
    stub: Path
    libs: Path  # nvidia_pytriton.libs
    caches: Path

    @classmethod
    def find(cls) -> "TritonInstall":
        try:
            import pytriton
        except ImportError as exc:  # pragma: no cover - dependency is pinned
            raise ServerStartError(f"nvidia-pytriton is not installed: it provides the tritonserver binary "
                                   f"(pip install {PYTRITON_REQUIREMENT})") from exc
        root = Path(pytriton.__file__).resolve().parent / "tritonserver"
        site = root.parent.parent
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=site / "nvidia_pytriton.libs",
            caches=root / "caches",
        )
        for path in (install.binary, install.python_backend / "libtriton_python.so",
                     install.python_backend / "triton_python_backend_utils.py", install.stub, install.libs):
            if not path.exists():
                raise ServerStartError(f"nvidia-pytriton install is incomplete: {path} is missing "
                                       f"(Python {version} stub needed)")
        return install

    def python_backend_files(self) -> dict[str, Path]:
        """The three files Triton expects in ``<backend-directory>/python/``."""
        return {
            "libtriton_python.so": self.python_backend / "libtriton_python.so",
            "triton_python_backend_utils.py": self.python_backend / "triton_python_backend_utils.py",
            "triton_python_backend_stub": self.stub,
        }

    @property
    def tritonserver_lib(self) -> Path:
        """The wheel's ``libtritonserver``, renamed ``libtritonserver-<hash>.so`` by auditwheel."""
        found = sorted(self.libs.glob("libtritonserver*.so*"))
        if not found:
            raise ServerStartError(f"no libtritonserver*.so in {self.libs}: nvidia-pytriton install is incomplete")
        return found[0]

    def backend_directory(self, cache_root: Path | None = None, native: dict[str, Path] | None = None) -> Path:
        """A ``--backend-directory`` with ``python/`` assembled from the wheel (symlinks, built once) and,
        for each ``native`` entry {backend name: built folder}, ``<name>`` linked to that folder (e.g.
        ``onnxruntime`` -> :func:`.backend_build.ensure_backend`). Each combination gets its own folder,
        so servers started with and without a native backend never rewrite each other's."""
        native = dict(sorted((native or {}).items()))
        suffix = "" if not native else "." + "-".join(f"{k}-{Path(v).name}" for k, v in native.items())
        target = Path(cache_root or default_cache_root()) / f"triton_backends{suffix}"
        python_dir = target / "python"
        wanted = self.python_backend_files()
        ok = python_dir.is_dir() and all(
            (python_dir / name).is_symlink() and os.readlink(python_dir / name) == str(src)
            for name, src in wanted.items()) and all(
            (target / name).is_symlink() and os.readlink(target / name) == str(src) for name, src in native.items())
        if ok:
            return target
        # Build in a temporary sibling and rename into place, so concurrent starts never see half a folder.
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="triton_backends.", dir=target.parent))
        (staging / "python").mkdir()
        for name, src in wanted.items():
            os.symlink(src, staging / "python" / name)
        for name, src in native.items():
            os.symlink(src, staging / name)
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:  # another process won the race; its folder is equivalent
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def environment(self, base: dict | None = None, stub_python: Path | None = None) -> dict:
        """``base`` (default: this process's environment) plus the loader and ``PATH`` entries above;
        ``stub_python`` (default: this interpreter) is the ``python3`` whose environment the stubs use."""
        env = dict(os.environ if base is None else base)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        ld = [str(self.libs)] + ([libdir] if libdir else [])
        if env.get("LD_LIBRARY_PATH"):
            ld.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
        bindir = str(Path(stub_python or sys.executable).parent)
        env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p])
        return env
