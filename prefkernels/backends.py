"""The one place a backend is chosen.

Order of precedence: the ``backend=`` argument, then env ``PREFKERNELS_BACKEND``, then
``auto`` (CPU tensors: native, then reference; CUDA tensors: native CUDA, then Triton, then
reference). A backend that is asked for but missing (``_C`` not built, no Triton, no CUDA
kernels in the build) degrades to the next one with a single warning saying why.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from prefkernels import reference

BACKENDS = ("auto", "native", "triton", "reference")
ENV_VAR = "PREFKERNELS_BACKEND"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # at import: find_spec is not traceable
# The most pair entries (2P) the CUDA rows_csr op groups by row: its placement takes steps of 32
# entries, each a dependent chain of about 0.1 us, so 128 steps (~13 us) against the reference's
# sort (six launches, ~15-30 us in a CUDA graph; estimates, not yet measured).
CUDA_CSR_MAX_ENTRIES = 4096


@dataclass(frozen=True)
class OpSet:
    """The ops a kernel backend implements, ``{namespace}::{prefix}{op}``, all with the schemas
    defined in csrc/ops.cpp (native: no prefix; Triton: ``triton_``, without rows_csr; the tests'
    CPU emulation of the CUDA code: namespace ``prefkernels_emu``)."""

    name: str
    prefix: str
    namespace: str = "prefkernels"

    def qualname(self, op: str) -> str:
        return f"{self.namespace}::{self.prefix}{op}"

    def op(self, op: str) -> Callable:
        return getattr(getattr(torch.ops, self.namespace), self.prefix + op).default

    @property
    def bt_forward(self) -> Callable:
        return self.op("bt_forward")

    @property
    def pool_forward(self) -> Callable:
        return self.op("pool_forward")

    @property
    def pool_backward(self) -> Callable:
        return self.op("pool_backward")

    def defines(self, op: str) -> bool:
        return hasattr(getattr(torch.ops, self.namespace), self.prefix + op)

    @functools.cached_property
    def own_rows_csr(self) -> Callable | None:
        """This namespace's rows_csr op, or None (Triton's): looked up once, as a missing op's
        lookup costs a few us, once per backward otherwise."""
        return self.op("rows_csr") if self.defines("rows_csr") else None

    def rows_csr(self, chosen_index, rejected_index, rows: int):
        """(row_ptr [rows + 1], row_entry [2P]) int64, the explicit pairs' entries by row for
        pool_backward, or (None, None) for the default pairing (chosen_index None), whose entry e
        is row e: this namespace's rows_csr op (native, the emulated CUDA), else the native op
        where it runs on the indices' device (Triton has none of its own), else the reference's
        stable sort (six launches on a GPU). On CUDA the op's one warp places 32 entries a step:
        past CUDA_CSR_MAX_ENTRIES the reference's sort takes over."""
        if chosen_index is None:
            return None, None
        op = self.own_rows_csr
        if op is None and (native := _native_for(chosen_index.device)) is not None:
            op = native.own_rows_csr
        if chosen_index.device.type == "cuda" and 2 * chosen_index.shape[0] > CUDA_CSR_MAX_ENTRIES:
            op = None
        if op is None:
            return reference.rows_csr(chosen_index, rejected_index, rows)
        return op(chosen_index, rejected_index, rows)


_warned: set[str] = set()
_loaded: dict[str, OpSet | None] = {}


def warn_once(message: str) -> None:
    """Warn once per message; silent while torch.compile traces (a warning would break a
    fullgraph trace), so a fallback is reported by the first eager call that meets it."""
    if torch.compiler.is_compiling():
        return
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from ``warn_once``, of the first frame outside prefkernels: the
    line of the caller's code that asked for the op, however deep in the package the fallback is found."""
    frame, level = sys._getframe(2), 2  # warn_once's caller, as stacklevel=2 names it
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "prefkernels":
        frame, level = frame.f_back, level + 1
    return level


def native_ops() -> OpSet | None:
    """The compiled ``prefkernels._C`` ops, or None when the extension is not built."""
    if "native" not in _loaded:
        _loaded["native"] = _load_native()
    return _loaded["native"]


def _load_native() -> OpSet | None:
    try:  # import_module: inside the package's own import, `from prefkernels import _C` words a
        # missing file as a circular import
        importlib.import_module("prefkernels._C")  # loading registers torch.ops.prefkernels.*
    except ImportError as err:
        warn_once(f"prefkernels: compiled extension prefkernels._C is not available ({err}); "
                  "using the pure-PyTorch reference backend. Build it with "
                  "`pip install -e . --no-build-isolation`.")
        return None
    from prefkernels import autograd
    ops = OpSet("native", "")
    autograd.register(ops)
    return ops


def native_has_cuda() -> bool:
    if native_ops() is None:
        return False
    from prefkernels import _C
    return bool(getattr(_C, "with_cuda", False))


def triton_ops() -> OpSet | None:
    """The Triton ops, or None when Triton is not installed."""
    if "triton" not in _loaded:
        _loaded["triton"] = _load_triton()
    return _loaded["triton"]


def _load_triton() -> OpSet | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from prefkernels import autograd, triton_bt
    autograd.register(triton_bt.OPS)
    return triton_bt.OPS


def preload() -> None:
    """Load the backends this process can use (``import prefkernels`` calls it): loading
    registers fake kernels and autograd, which torch.compile cannot trace, so it must not wait
    for a first call that may be inside a compiled function. Triton is loaded only where it
    can run (CUDA available, or TRITON_INTERPRET=1), so a CPU-only import stays light."""
    native_ops()
    if TRITON_INSTALLED and (triton_interpreted() or torch.cuda.is_available()):
        triton_ops()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '3.2.0' or '2.4.0rc1'."""
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2])


def triton_interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels in this environment, or None.

    Triton before 3.7 converts 1-element arrays to Python ints, which NumPy 2.4 refuses
    (triton-lang/triton#9171): every interpreted launch then fails inside Triton."""
    import numpy
    import triton
    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} "
                "(triton-lang/triton#9171); install numpy<2.4 or triton>=3.7")
    return None


def requested(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        source = "backend" if backend is not None else f"env {ENV_VAR}"
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


def _native_for(device: torch.device) -> OpSet | None:
    ops = native_ops()
    if ops is None:
        return None
    if device.type == "cuda" and not native_has_cuda():
        return None
    if device.type not in ("cpu", "cuda"):
        return None
    return ops


def _triton_for(device: torch.device) -> OpSet | None:
    if device.type == "cuda":
        return triton_ops()
    if device.type == "cpu" and triton_interpreted() and triton_ops() is not None:
        return None if triton_interpreter_problem() else triton_ops()
    return None


def select(backend: str | None, device: torch.device) -> OpSet | None:
    """OpSet for ``device``, or None for the reference backend."""
    name = requested(backend)
    if name == "reference":
        return None
    if name == "auto":
        chain = ("native", "triton") if device.type == "cuda" else ("native",)
    else:
        chain = (name, "native") if name == "triton" else (name,)
    finders = {"native": _native_for, "triton": _triton_for}
    for candidate in chain:
        ops = finders[candidate](device)
        if ops is not None:
            if name not in ("auto", ops.name):
                warn_once(f"prefkernels: backend {name!r} is unavailable for {device.type} tensors "
                          f"({why_unavailable(name, device)}); using {ops.name!r}")
            return ops
    if name != "auto":
        warn_once(f"prefkernels: backend {name!r} is unavailable for {device.type} tensors "
                  f"({why_unavailable(name, device)}); using 'reference'")
    return None


def why_unavailable(name: str, device: torch.device) -> str:
    """Why kernel backend ``name`` cannot run on ``device`` (for messages)."""
    if name == "native":
        if native_ops() is None:
            return "prefkernels._C is not built"
        return "this build of prefkernels._C has no CUDA kernels" if device.type == "cuda" else "unsupported device"
    if not TRITON_INSTALLED:  # not triton_ops(): loading it registers ops, which a compiled call cannot trace
        return "triton is not installed"
    if device.type == "cpu" and triton_interpreted() and (problem := triton_interpreter_problem()):
        return problem
    return "Triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
