"""Build and load the native CPU operators of D2R: the module chain (``csrc/module_chain.cpp``)
and the routing (``csrc/routing.cpp``). They compute what
:mod:`~d2r_torchrl.modules.d2r_spec` specifies (``tests/test_native_chain.py``,
``tests/test_routing_slots.py``).

The extension is compiled with the system C++ compiler on first use (about a minute on a
small CPU; one line on stderr says so before it starts) for the vector instructions this CPU offers, and cached
by PyTorch under ``TORCH_EXTENSIONS_DIR`` (``~/.cache/torch_extensions`` by default) in a
folder of its own per source tree, compiler flags, torch and Python release, so two
checkouts never rebuild over each other. Where it cannot be built, a warning says why once
and the chain runs its Python path.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import sys
import warnings
from types import ModuleType
from typing import Iterator

import torch

CSRC = pathlib.Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("module_chain.cpp", "routing.cpp", "extension.cpp")]
_VECTOR_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_extension: ModuleType | None = None
_unavailable: str | None = None


def build_name(cflags: list[str]) -> str:
    """The extension's name and cache folder: ``d2r_native_<capability>_<hash>``, the hash over
    the sources (path and text), ``cflags``, and the torch and Python releases (a build for
    another torch or Python cannot load)."""
    digest = hashlib.sha256()
    for part in (str(CSRC.resolve()), *cflags, torch.__version__, f"py{sys.version_info[0]}{sys.version_info[1]}"):
        digest.update(part.encode() + b"\0")
    for path in sorted(path for path in CSRC.iterdir() if path.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"d2r_native_{torch.backends.cpu.get_cpu_capability().lower()}_{digest.hexdigest()[:16]}"


def load_native_chain() -> ModuleType | None:
    """The compiled extension (the chain's ``forward`` and ``backward``, and ``route_slots``),
    or ``None`` after a warning if it cannot be built here. The first call on a machine
    compiles it and says so on stderr first."""
    global _extension, _unavailable
    if _extension is not None or _unavailable is not None:
        return _extension
    with _without_cuda_home_notice():
        from torch.utils import cpp_extension

    cflags = ["-O3", "-fopenmp", *_VECTOR_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    try:
        name = build_name(cflags)
        build_dir = pathlib.Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not (build_dir / f"{name}.so").exists():
            print(
                "Compiling D2R's native CPU module chain (first use only, about a minute; "
                f"cached in {build_dir})...",
                file=sys.stderr,
                flush=True,
            )
        _extension = cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            with_cuda=False,
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as error:  # no compiler or ninja, or a failed build
        _unavailable = str(error)
        warnings.warn(
            f"The native D2R module chain could not be built ({_unavailable.strip().splitlines()[-1]}); "
            "the chain runs its Python path. It needs a C++ compiler (g++) and ninja "
            "(`pip install ninja`); set compile.native_chain=false to silence this."
        )
    return _extension


class _NoCudaHomeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." notice, which importing
    ``torch.utils.cpp_extension`` logs on a machine without a GPU: this CPU-only extension
    never uses CUDA."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


@contextlib.contextmanager
def _without_cuda_home_notice() -> Iterator[None]:
    logger, notice_filter = logging.getLogger("torch.utils.cpp_extension"), _NoCudaHomeNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


def runs_natively(tensor: torch.Tensor) -> bool:
    """Whether the extension may run on ``tensor`` here: a CPU tensor outside
    ``torch.compile`` (the extension is opaque to the compiler)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()
