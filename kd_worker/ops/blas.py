"""A fast BLAS for MLX's Linux CPU backend.

The Linux `mlx-cpu` wheel links netlib's reference BLAS (~8 GFLOP/s here). Loading OpenBLAS
into the global symbol scope *before* `mlx.core` is imported makes MLX's `cblas_sgemm` calls
resolve to it (~300-470 GFLOP/s). OpenBLAS 0.3.21 misdetects some VMs' CPUs and falls back to a
generic kernel, so its core type is chosen from /proc/cpuinfo and must be in the environment
before the library loads. macOS is left alone (Accelerate/Metal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

INSTALL_HINT = (
    "install OpenBLAS for ~15x faster CPU training: Debian/Ubuntu `apt-get install libopenblas0-pthread`, "
    "Fedora `dnf install openblas`, or set KD_BLAS_LIBRARY=/path/to/libopenblas.so"
)


@dataclass(frozen=True)
class BlasInfo:
    library: str | None  # path of the BLAS MLX resolves cblas_* to (None: unknown / platform default)
    coretype: str | None
    fast: bool
    note: str


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def choose_coretype(flags: set[str]) -> str | None:
    """OpenBLAS kernel for this CPU: avx512f -> SkylakeX, avx2 -> Haswell, else let it detect."""
    if "avx512f" in flags:
        return "SkylakeX"
    if "avx2" in flags:
        return "Haswell"
    return None


def candidate_paths(machine: str) -> list[Path]:
    triplet = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine, f"{machine}-linux-gnu")
    paths = [
        Path(f"/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0"),
        Path(f"/usr/lib/{triplet}/openblas-pthread/libblas.so.3"),
        Path(f"/usr/lib/{triplet}/libopenblas.so.0"),
        Path("/usr/lib64/libopenblasp.so.0"),
        Path("/usr/lib64/libopenblas.so.0"),
        Path("/usr/lib/libopenblas.so"),
    ]
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(Path(found))
    return paths


def mapped_blas(maps: str) -> str | None:
    """The BLAS library mapped into this process (from /proc/self/maps), OpenBLAS first."""
    libs = {line.split()[-1] for line in maps.splitlines() if "blas" in line.rsplit("/", 1)[-1].lower()}
    for lib in sorted(libs):
        if "openblas" in lib.lower():
            return lib
    return sorted(libs)[0] if libs else None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def ensure_fast_blas(library: Path | None = None, coretype: str | None = None) -> BlasInfo:
    """Load OpenBLAS globally before MLX (Linux only). Idempotent; never raises."""
    if sys.platform != "linux":
        return BlasInfo(None, None, True, f"{sys.platform}: MLX uses Accelerate/Metal")
    current = mapped_blas(_read("/proc/self/maps"))
    if current and "openblas" in current.lower():
        return BlasInfo(current, os.environ.get("OPENBLAS_CORETYPE"), True, "OpenBLAS already loaded")
    if "mlx.core" in sys.modules:
        note = "mlx.core was imported before kd_worker.ops.blas.ensure_fast_blas(); MLX keeps its reference BLAS"
        log.warning("blas_too_late", note=note)
        return BlasInfo(current, None, False, note)
    chosen = coretype or os.environ.get("OPENBLAS_CORETYPE") or choose_coretype(cpu_flags(_read("/proc/cpuinfo")))
    paths = [library] if library else candidate_paths(platform.machine())
    for path in paths:
        if not Path(path).exists():
            continue
        if chosen:
            os.environ["OPENBLAS_CORETYPE"] = chosen  # read by OpenBLAS when it initialises
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            log.warning("blas_load_failed", library=str(path), error=str(e))
            continue
        log.debug("blas_loaded", library=str(path), coretype=chosen)
        return BlasInfo(str(path), chosen, True, "OpenBLAS loaded before MLX")
    if library:
        note = f"KD_BLAS_LIBRARY={library} could not be loaded; {INSTALL_HINT}"
    else:
        note = f"no OpenBLAS found; MLX falls back to its slow reference BLAS; {INSTALL_HINT}"
    log.warning("blas_slow", note=note)
    return BlasInfo(current, None, False, note)
