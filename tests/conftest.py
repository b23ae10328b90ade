"""Session-wide set-up: a fast BLAS before anything imports mlx.core, and the demo models."""

from __future__ import annotations

from kd_worker.blas import ensure_fast_blas

ensure_fast_blas()  # must precede every `import mlx.core` in the test session

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    """The tiny demo models, built once per session (about 2 s)."""
    from kd_worker.tinymodels import build_demo_models

    root = tmp_path_factory.mktemp("models")
    build_demo_models(root)
    return root
