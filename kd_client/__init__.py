"""kd-daemon's producer side: the `kd-client` CLI, EGO's enqueue API and the cortex watcher.

Never imports `kd_worker` or mlx.
"""
