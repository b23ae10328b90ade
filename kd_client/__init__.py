"""kd-daemon's producer side: the `kd-client` CLI, EGO's enqueue API (`KDClient`), the cortex
watcher and `kd-client serve`. Never imports `kd_worker`; mlx only on use (kd_client.hotswap,
kd_client.neurons and kd_client.promptcache import it inside functions)."""

from kd_client.api import KDClient, Receipt

__all__ = ["KDClient", "Receipt"]
