"""kd-daemon's producer side: the `kd-client` CLI, EGO's enqueue API (`KDClient`) and the
cortex watcher. Never imports `kd_worker` or mlx (kd_client.hotswap imports mlx on use only)."""

from kd_client.api import KDClient, Receipt

__all__ = ["KDClient", "Receipt"]
