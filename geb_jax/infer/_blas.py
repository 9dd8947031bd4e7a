"""Set / read the number of threads of the BLAS numpy uses, at run time (no threadpoolctl).

Why: decoding multiplies a vector by each weight matrix (a memory-bound GEMV). On a small
shared machine a second OpenBLAS thread often waits on a busy core: on the 2-core development
machine one thread streamed a 46 MB float32 matrix in ~2 ms and two threads took ~8 ms while
other jobs ran. `--threads 1` is therefore offered by the CLI; the library never changes the
setting unless asked. Works for the OpenBLAS builds numpy wheels bundle (scipy-openblas, plain
OpenBLAS) found through /proc/self/maps (Linux); elsewhere the functions return None/False.
"""
from __future__ import annotations

import ctypes

_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads_64_",
        "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
        "openblas_set_num_threads")
_GET = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads_64_",
        "scipy_openblas_get_num_threads", "openblas_get_num_threads64_",
        "openblas_get_num_threads")


def _blas_libraries() -> list[str]:
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded)  pylint: disable=import-outside-toplevel
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "blas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if ".so" in p)


def _function(names: tuple[str, ...]):
    for path in _blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                return fn
    return None


def set_blas_threads(n: int) -> bool:
    """Limit numpy's BLAS to n threads; False when no known BLAS was found."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    fn = _function(_SET)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int]
    fn(n)
    return True


def get_blas_threads() -> int | None:
    fn = _function(_GET)
    if fn is None:
        return None
    fn.restype = ctypes.c_int
    return int(fn())
