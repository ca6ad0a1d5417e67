"""Build Triton's own ONNX Runtime backend (``libtriton_onnxruntime.so``) for the bundled server, cached.

The ``nvidia-pytriton`` wheel bundles ``tritonserver`` 2.51 with the Python backend only. Triton's
official ``onnxruntime_backend`` at the matching release (``r24.10``) compiles in well under a minute
against the ``libonnxruntime.so`` that the ``onnxruntime`` wheel ships, and the bundled server loads
it. :func:`ensure_backend` does that once per (Triton release, ONNX Runtime version) and returns a
folder that can be linked as ``<backend-directory>/onnxruntime/``::

    <cache>/onnxruntime_backend/r24.10-ort1.32.0-<libhash>/
        libtriton_onnxruntime.so      built here (RUNPATH $ORIGIN)
        libonnxruntime.so.1           -> the wheel's onnxruntime/capi/libonnxruntime.so.<version>
        libtritonserver.so            -> nvidia_pytriton.libs/libtritonserver-<hash>.so (the wheel renamed it;
                                         without this link the backend fails with "cannot open shared object")
        build.json                    what was built from what

Rebuilt when the ONNX Runtime wheel changes: the backend needs ``OrtGetApiBase@VERS_<version>``.

Sources: ``sources`` (a folder laid out as ``triton/{core,common,backend,onnxruntime_backend}`` +
``onnxruntime/onnxruntime_c_api.h``, e.g. ``../shared/third_party``), else ``$MORPHOCAM_TRITON_SOURCES``,
else such a folder found beside the project (``<repo>/../shared/third_party``), else the tagged upstream
repositories cloned from GitHub and the C API header of the installed version downloaded from the
ONNX Runtime repository (a machine with a network).

Tools: ``cmake`` >= 3.17, a C++17 compiler, ``ninja`` or ``make``, RapidJSON headers and the googletest
sources (Triton common r24.10 always adds its unit tests). Missing Debian packages (``rapidjson-dev``,
``googletest``, ``cmake``, ``g++``, ``ninja-build``) are installed with ``apt-get`` when running as root
(CI does); otherwise :class:`BackendBuildError` says what to install. The caller then falls back to
the Python-backend classifier.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import ServerStartError

TRITON_TAG = "r24.10"  # the release of the tritonserver 2.51 that nvidia-pytriton 0.7.0 bundles
TRITON_REPOS = ("core", "common", "backend", "onnxruntime_backend")
GITHUB = "https://github.com/triton-inference-server/{}.git"
ORT_HEADER_URL = ("https://raw.githubusercontent.com/microsoft/onnxruntime/v{version}/include/onnxruntime/core/"
                  "session/onnxruntime_c_api.h")
BACKEND_LIB = "libtriton_onnxruntime.so"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Debian package -> what shows it is present.
APT_PACKAGES = {"rapidjson-dev": "rapidjson headers", "googletest": "googletest sources",
                "cmake": "cmake", "g++": "C++ compiler", "ninja-build": "ninja"}


class BackendBuildError(ServerStartError):
    """The native backend cannot be built here; the message says what is missing."""


@dataclass(frozen=True)
class OrtWheel:
    """The installed ``onnxruntime`` wheel's shared library and version."""

    version: str
    library: Path  # onnxruntime/capi/libonnxruntime.so.<version>

    @classmethod
    def find(cls) -> "OrtWheel":
        try:
            import onnxruntime
        except ImportError as exc:  # pragma: no cover - pinned dependency
            raise BackendBuildError("onnxruntime is not installed: its wheel provides libonnxruntime.so") from exc
        capi = Path(onnxruntime.__file__).resolve().parent / "capi"
        libs = sorted(capi.glob("libonnxruntime.so.*"))
        if not libs:
            raise BackendBuildError(f"no libonnxruntime.so.* in {capi}: this onnxruntime wheel ships no C library")
        return cls(version=onnxruntime.__version__, library=libs[-1])

    @property
    def key(self) -> str:
        """Cache key: same Triton release, same ORT version, same library file."""
        digest = hashlib.sha256(str(self.library).encode()).hexdigest()[:8]
        return f"{TRITON_TAG}-ort{self.version}-{digest}"


def cache_dir(cache_root: Path) -> Path:
    return Path(cache_root) / "onnxruntime_backend"


def is_built(folder: Path) -> bool:
    return all((folder / name).exists() for name in (BACKEND_LIB, "libonnxruntime.so.1", "libtritonserver.so"))


# ---------------------------------------------------------------------------- sources
def default_sources() -> Path | None:
    """``$MORPHOCAM_TRITON_SOURCES`` or ``<repo>/../shared/third_party`` when it holds the four repositories."""
    candidates = [os.environ.get("MORPHOCAM_TRITON_SOURCES"), PROJECT_ROOT.parent / "shared" / "third_party"]
    for c in candidates:
        if c and all((Path(c) / "triton" / r / "CMakeLists.txt").is_file() for r in TRITON_REPOS):
            return Path(c)
    return None


def _ort_header(sources: Path) -> Path:
    header = sources / "onnxruntime" / "onnxruntime_c_api.h"
    if not header.is_file():
        raise BackendBuildError(f"{header} is missing: the ONNX Runtime C API header the backend compiles against")
    return header


def fetch_sources(dest: Path, ort_version: str, log=print) -> Path:
    """Clone the four Triton repositories at :data:`TRITON_TAG` and download the ORT C API header."""
    if not shutil.which("git"):
        raise BackendBuildError("git is needed to clone Triton's sources (or pass local sources: "
                                "morphocam-serve --backend-sources DIR)")
    for repo in TRITON_REPOS:
        target = dest / "triton" / repo
        if (target / "CMakeLists.txt").is_file():
            continue
        log(f"cloning {GITHUB.format(repo)} at {TRITON_TAG}")
        run = subprocess.run(["git", "clone", "--depth", "1", "--branch", TRITON_TAG, GITHUB.format(repo), str(target)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise BackendBuildError(f"cannot clone {GITHUB.format(repo)} ({run.stderr.strip()[-300:]}); without a "
                                    f"network, point --backend-sources at a local copy of the sources")
    header = dest / "onnxruntime" / "onnxruntime_c_api.h"
    if not header.is_file():
        header.parent.mkdir(parents=True, exist_ok=True)
        url = ORT_HEADER_URL.format(version=ort_version)
        log(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                header.write_bytes(resp.read())
        except OSError as exc:
            raise BackendBuildError(f"cannot download the ONNX Runtime C API header from {url}: {exc}") from exc
    return dest


# ---------------------------------------------------------------------------- tools
def googletest_dir() -> Path | None:
    for c in ("/usr/src/googletest", "/usr/src/gtest"):
        if (Path(c) / "CMakeLists.txt").is_file():
            return Path(c)
    return None


def missing_tools() -> dict[str, str]:
    """{Debian package: what is missing} for every build prerequisite not found on this machine."""
    missing = {}
    if not shutil.which("cmake"):
        missing["cmake"] = APT_PACKAGES["cmake"]
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing["g++"] = APT_PACKAGES["g++"]
    if not (shutil.which("ninja") or shutil.which("make")):
        missing["ninja-build"] = APT_PACKAGES["ninja-build"]
    if not any(Path(p, "rapidjson", "rapidjson.h").is_file() for p in ("/usr/include", "/usr/local/include")):
        missing["rapidjson-dev"] = APT_PACKAGES["rapidjson-dev"]
    if googletest_dir() is None:
        missing["googletest"] = APT_PACKAGES["googletest"]
    return missing


def install_tools(missing: dict[str, str], log=print) -> None:
    """``apt-get install`` the missing packages when we are root on a Debian/Ubuntu machine, else explain."""
    names = " ".join(sorted(missing))
    how = f"install them (Debian/Ubuntu: sudo apt-get install -y {names})"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BackendBuildError(f"building Triton's ONNX Runtime backend needs {', '.join(missing.values())}: {how}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *sorted(missing)]
    log(f"installing {names} with apt-get")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:  # stale package lists on a fresh image: refresh once and retry
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise BackendBuildError(f"apt-get could not install {names} ({run.stderr.strip()[-300:]}): {how}")


# ---------------------------------------------------------------------------- build
@contextlib.contextmanager
def _locked(path: Path):
    """One build at a time per cache folder (two servers starting at once share the result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    run = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-25:])
        raise BackendBuildError(f"{what} failed (exit {run.returncode}): {' '.join(cmd[:3])} ...\n{tail}")


def cmake_command(sources: Path, build: Path, ort_include: Path, ort_lib_dir: Path, generator: str) -> list[str]:
    """The configure line (flags from ``../shared/NOTES.md``): CPU only, local sources, no downloads."""
    triton = sources / "triton"
    return [
        "cmake", "-G", generator, "-S", str(triton / "onnxruntime_backend"), "-B", str(build),
        "-DCMAKE_BUILD_TYPE=Release", "-DTRITON_ENABLE_GPU=OFF",
        "-DTRITON_ENABLE_ONNXRUNTIME_TENSORRT=OFF", "-DTRITON_ENABLE_ONNXRUNTIME_OPENVINO=OFF",
        # Giving the library path is what stops the CMake from building ONNX Runtime in Docker.
        f"-DTRITON_ONNXRUNTIME_INCLUDE_PATHS={ort_include}", f"-DTRITON_ONNXRUNTIME_LIB_PATHS={ort_lib_dir}",
        f"-DTRITON_BACKEND_REPO_TAG={TRITON_TAG}", f"-DTRITON_CORE_REPO_TAG={TRITON_TAG}",
        f"-DTRITON_COMMON_REPO_TAG={TRITON_TAG}", "-DFETCHCONTENT_FULLY_DISCONNECTED=ON",
        f"-DFETCHCONTENT_SOURCE_DIR_REPO-COMMON={triton / 'common'}",
        f"-DFETCHCONTENT_SOURCE_DIR_REPO-CORE={triton / 'core'}",
        f"-DFETCHCONTENT_SOURCE_DIR_REPO-BACKEND={triton / 'backend'}",
        f"-DFETCHCONTENT_SOURCE_DIR_GOOGLETEST={googletest_dir()}",
    ]


def build_backend(out: Path, wheel: OrtWheel, tritonserver_lib: Path, sources: Path | None = None,
                  install_missing: bool = True, log=print) -> Path:
    """Compile the backend into ``out`` (created; must not exist) and link its two libraries beside it."""
    missing = missing_tools()
    if missing:
        if not install_missing:
            raise BackendBuildError(f"building Triton's ONNX Runtime backend needs {', '.join(missing.values())}")
        install_tools(missing, log)
        still = missing_tools()
        if still:
            raise BackendBuildError(f"still missing after apt-get: {', '.join(still.values())}")
    work = Path(tempfile.mkdtemp(prefix="ortbackend.build.", dir=out.parent))
    try:
        if sources is None:
            sources = fetch_sources(out.parent / "src", wheel.version, log)
        header = _ort_header(sources)
        # The CMake links -lonnxruntime: a folder with the wheel's library under its link names.
        libdir = work / "ortlib"
        libdir.mkdir()
        for name in ("libonnxruntime.so", "libonnxruntime.so.1", wheel.library.name):
            os.symlink(wheel.library, libdir / name)
        generator = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
        t0 = time.monotonic()
        log(f"building {BACKEND_LIB} ({TRITON_TAG}) against onnxruntime {wheel.version} from {sources} ...")
        _run(cmake_command(sources, work / "build", header.parent, libdir, generator), work, "cmake configure")
        _run(["cmake", "--build", str(work / "build"), "--target", "triton-onnxruntime-backend", "--parallel",
              str(os.cpu_count() or 1)], work, "cmake build")
        built = work / "build" / BACKEND_LIB
        if not built.is_file():
            raise BackendBuildError(f"the build finished without {built}")
        staging = work / "backend"
        staging.mkdir()
        shutil.copy2(built, staging / BACKEND_LIB)
        os.symlink(wheel.library, staging / "libonnxruntime.so.1")
        os.symlink(tritonserver_lib, staging / "libtritonserver.so")
        (staging / "build.json").write_text(json.dumps({
            "triton_tag": TRITON_TAG, "onnxruntime": wheel.version, "libonnxruntime": str(wheel.library),
            "libtritonserver": str(tritonserver_lib), "sources": str(sources), "generator": generator,
            "seconds": round(time.monotonic() - t0, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
        os.rename(staging, out)
        log(f"built {BACKEND_LIB} in {time.monotonic() - t0:.0f} s")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_backend(cache_root: Path, tritonserver_lib: Path, sources: Path | None = None,
                   install_missing: bool = True, rebuild: bool = False, log=print) -> Path:
    """The cached backend folder for the installed ONNX Runtime, built first when missing."""
    wheel = OrtWheel.find()
    root = cache_dir(cache_root)
    folder = root / wheel.key
    if is_built(folder) and not rebuild:
        return folder
    with _locked(root / ".lock"):
        if is_built(folder) and not rebuild:  # built by another process while we waited
            return folder
        # Build beside the cached folder and swap only on success: a failed rebuild keeps the old backend.
        fresh, old = root / f".{wheel.key}.new", root / f".{wheel.key}.old"
        for leftover in (fresh, old):
            shutil.rmtree(leftover, ignore_errors=True)
        build_backend(fresh, wheel, tritonserver_lib, sources or default_sources(), install_missing, log)
        if folder.exists():
            os.rename(folder, old)
        os.rename(fresh, folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder


def native_models(repository: Path) -> list[str]:
    """Models of ``repository`` whose ``config.pbtxt`` runs on Triton's ONNX Runtime backend."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    names = []
    for cfg_file in sorted(Path(repository).glob("*/config.pbtxt")):
        try:
            cfg = text_format.Parse(cfg_file.read_text(), mc.ModelConfig())
        except (OSError, text_format.ParseError):
            continue  # Triton reports an unreadable config itself, naming the model
        if cfg.platform == "onnxruntime_onnx" or cfg.backend == "onnxruntime":
            names.append(cfg_file.parent.name)
    return names
