"""Running on a machine: the fast-BLAS loader, logging set-up, terminal progress, `doctor`, and the
launchd/systemd service (rendering unit files, pure; running launchctl/systemctl, a thin boundary).

May import `kd_worker.engine` (its types, to render progress); must not import `kd_worker.daemon` or
`kd_worker.cli`. Nothing here imports mlx at module level (the BLAS must load first).
"""
