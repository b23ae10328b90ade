"""BLAS selection: core type from CPU flags, library discovery, the loaded library in this process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kd_worker.ops import blas


def test_core_type_from_cpu_flags():
    assert blas.choose_coretype({"fpu", "avx2", "avx512f"}) == "SkylakeX"
    assert blas.choose_coretype({"fpu", "avx2"}) == "Haswell"
    assert blas.choose_coretype({"neon"}) is None
    text = "processor : 0\nflags\t\t: fpu vme avx2 avx512f\n"
    assert blas.cpu_flags(text) == {"fpu", "vme", "avx2", "avx512f"}
    assert blas.cpu_flags("Features\t: fp asimd\n") == {"fp", "asimd"}


def test_candidates_cover_debian_multiarch():
    paths = [str(p) for p in blas.candidate_paths("x86_64")]
    assert "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0" in paths
    assert any("aarch64-linux-gnu" in str(p) for p in blas.candidate_paths("aarch64"))


def test_mapped_blas_prefers_openblas():
    maps = (
        "7f0 r-xp 0 0 0 /x/mlx_cpu.libs/libblas-abc.so.3\n"
        "7f1 r-xp 0 0 0 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0\n"
    )
    assert blas.mapped_blas(maps).endswith("libopenblas.so.0")
    assert blas.mapped_blas("7f0 r-xp 0 0 0 /lib/libc.so.6\n") is None


@pytest.mark.skipif(sys.platform != "linux", reason="the Linux CPU wheel is what needs a BLAS")
def test_this_test_session_runs_on_openblas():
    """conftest.py called ensure_fast_blas() before mlx was imported: MLX must resolve to OpenBLAS."""
    import mlx.core as mx

    mx.eval(mx.random.normal((64, 64)) @ mx.random.normal((64, 64)))
    assert "openblas" in (blas.mapped_blas(Path("/proc/self/maps").read_text()) or "")


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_too_late_is_reported_not_hidden():
    code = (
        "import mlx.core\nfrom kd_worker.ops.blas import ensure_fast_blas\ni = ensure_fast_blas()\n"
        "print(i.fast, i.note)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines()[-1].startswith("False") and "imported before" in out.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_missing_library_explains_how_to_install(tmp_path):
    code = (
        f"from pathlib import Path\nfrom kd_worker.ops.blas import ensure_fast_blas\n"
        f"i = ensure_fast_blas(Path('{tmp_path}/nope.so'))\nprint(i.fast, i.note)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines()[-1].startswith("False") and "libopenblas0-pthread" in out.stdout
