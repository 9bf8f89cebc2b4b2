"""The C++/CUDA extension in csrc/ (multi-tensor AdamW, norm and scale), built with ninja through
``torch.utils.cpp_extension`` on first use, or ahead of time by ``python -m engine build-ext``.

- The CUDA kernels are built when torch is a CUDA build and a CUDA toolkit (nvcc) is found, for
  sm_80 and sm_90 (+PTX); ``TORCH_CUDA_ARCH_LIST`` overrides. Otherwise only the CPU twins.
- Builds are cached in ``$ENGINE_EXT_DIR`` (default ``~/.cache/engine/extension``), one folder per
  key: the sources, torch and CUDA versions, flags and this CPU's features (-march=native).
- A build that fails warns once and callers use PyTorch's path; ``ENGINE_STRICT=1`` (CI) raises.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

from engine import backend

SOURCES = ("bindings.cpp", "multi_tensor_cpu.cpp", "multi_tensor.h")
CUDA_SOURCES = ("multi_tensor_cuda.cu",)
DEFAULT_ARCHS = "8.0;9.0+PTX"

_module: ModuleType | None = None
_failure: str | None = None


def _source_dir() -> Path:
    return Path(str(resources.files("engine.csrc")))


def cuda_home() -> str | None:
    """A CUDA toolkit with nvcc and headers, for CUDA builds of torch; None otherwise."""
    if torch.version.cuda is None:
        return None
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None]
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


def _cpu_features() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build_key(with_cuda: bool, archs: str) -> str:
    digest = hashlib.sha256()
    for name in SOURCES + (CUDA_SOURCES if with_cuda else ()):
        digest.update((_source_dir() / name).read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{with_cuda}|{archs}|{sys.version}|{_cpu_features()}".encode())
    digest.update(Path(__file__).read_bytes())  # the flags below
    return digest.hexdigest()[:16]


def built_archs() -> str:
    """The CUDA architectures a build targets (TORCH_CUDA_ARCH_LIST, else sm_80 and sm_90)."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)


def _quiet_import_of_cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found, using
    CUDA_HOME=..." warning: building the CUDA half on a machine without a GPU is expected (the
    kernels run where the extension is used on a GPU)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def build(*, verbose: bool = False) -> ModuleType:
    """Compile (or load from the cache) and import the extension; raises if it cannot."""
    home = cuda_home()
    if home is not None:
        os.environ.setdefault("CUDA_HOME", home)  # before cpp_extension reads it at import
    cpp_extension = _quiet_import_of_cpp_extension()

    if torch.version.cuda is not None and home is None:
        backend.warn_fallback("engine extension (CUDA half)", "no CUDA toolkit (nvcc) found: only the CPU twins are built")
    with_cuda = home is not None
    archs = built_archs()
    key = _build_key(with_cuda, archs)
    build_dir = Path(os.environ.get("ENGINE_EXT_DIR", Path.home() / ".cache" / "engine" / "extension")) / key
    build_dir.mkdir(parents=True, exist_ok=True)
    names = SOURCES[:2] + (CUDA_SOURCES if with_cuda else ())
    # -fno-math-errno lets sqrt vectorise (it changes no result for the non-negative inputs here);
    # FMAs are written out where torch uses them, so the compilers must not add others.
    cflags = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"] + (["-DENGINE_WITH_CUDA"] if with_cuda else [])
    previous_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda:
        cpp_extension.CUDA_HOME = home
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        return cpp_extension.load(
            name="engine_ext",
            sources=[str(_source_dir() / name) for name in names],
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3", "--fmad=false"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            verbose=verbose,
        )
    finally:
        if previous_archs is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def _covers(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a build for ``archs`` ("8.0;9.0+PTX") runs on a GPU of ``capability``: a binary for
    the same major version and a lower or equal minor, or PTX for an older architecture."""
    for entry in archs.replace(",", ";").split(";"):
        name = entry.strip().removesuffix("+PTX")
        if not name:
            continue
        major, minor = (int(part) for part in name.split("."))
        if (major == capability[0] and minor <= capability[1]) or ("+PTX" in entry and (major, minor) <= capability):
            return True
    return False


def cannot_run(module: ModuleType, devices) -> str | None:
    """Why ``module`` cannot serve tensors on ``devices`` (no CUDA kernels, or none for this GPU), or None."""
    for device in devices:
        if device.type != "cuda":
            continue
        if not module.cuda_built():
            return "the extension was built without CUDA kernels"
        capability = torch.cuda.get_device_capability(device)
        if not _covers(built_archs(), capability):
            return f"the extension's CUDA kernels ({built_archs()}) do not run on sm_{capability[0]}{capability[1]}"
    return None


def load() -> ModuleType | None:
    """The extension, built on first use; None (after one warning) if it cannot be built."""
    global _module, _failure
    if _module is None and _failure is None:
        try:
            _module = build()
        except Exception as error:  # a compiler error, a missing toolchain: reported, not fatal
            _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    if _module is None:
        backend.warn_fallback("engine extension", f"could not be built ({_failure})")
    return _module
