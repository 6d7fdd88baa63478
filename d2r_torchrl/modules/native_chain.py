"""Build and load the native CPU operators of D2R: the module chain (``csrc/module_chain.cpp``)
and the routing (``csrc/routing.cpp``). They compute what
:mod:`~d2r_torchrl.modules.d2r_spec` specifies (``tests/test_native_chain.py``,
``tests/test_routing_slots.py``).

The extension is compiled with the system C++ compiler on first use (cached by PyTorch in
``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by default) for the vector
instructions this CPU offers. Where it cannot be built, a warning says why once and the
chain runs its Python path.
"""
from __future__ import annotations

import pathlib
import re
import warnings
from types import ModuleType

import torch

SOURCES = [
    pathlib.Path(__file__).with_name("csrc") / name for name in ("module_chain.cpp", "routing.cpp", "extension.cpp")
]
_VECTOR_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_extension: ModuleType | None = None
_unavailable: str | None = None


def load_native_chain() -> ModuleType | None:
    """The compiled extension (the chain's ``forward`` and ``backward``, and ``route_slots``),
    or ``None`` after a warning if it cannot be built here."""
    global _extension, _unavailable
    if _extension is not None or _unavailable is not None:
        return _extension
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    # one build per vector capability and torch release (a build for another torch cannot load)
    name = re.sub(r"\W", "_", f"d2r_module_chain_{capability}_torch{torch.__version__}").lower()
    try:
        _extension = cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_include_paths=[str(SOURCES[0].parent)],
            extra_cflags=["-O3", "-fopenmp", *_VECTOR_FLAGS.get(capability, [])],
            extra_ldflags=["-fopenmp"],
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


def runs_natively(tensor: torch.Tensor) -> bool:
    """Whether the extension may run on ``tensor`` here: a CPU tensor outside
    ``torch.compile`` (the extension is opaque to the compiler)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()
