"""Swap the LoRA adapter of an already loaded mlx-lm model in place: the base stays resident.

The cortex loads its student once (`mlx_lm.load(base)` or `mlx_lm.load(base, adapter_path=v)`)
and hands the model to an `AdapterSlot`. `apply(version_dir)` reads and checks the new adapter
completely before touching the model (manifest checksums, every tensor name and shape, the way
`mlx_lm.tuner.utils.load_adapters` does), then replaces the LoRA arrays. A new LoRA shape (rank,
scale, layers, keys) re-wraps the base layers instead; any failure puts the previous adapter
back and raises `AdapterSwapError`. The result equals a fresh `mlx_lm.load(base, adapter_path=v)`.

mlx is imported lazily, here only: `kd_client` itself never needs MLX. Call `apply` on the
thread that runs the model (the watcher thread only signals).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from jobs import publisher
from jobs.errors import ModelError, PublishError

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

log = structlog.get_logger(__name__)

ADAPTER_LEAVES = frozenset({"lora_a", "lora_b", "m"})  # mlx-lm's LoRA / DoRA parameters
WEIGHTS, CONFIG = publisher.WEIGHTS, publisher.ADAPTER_CONFIG


class AdapterSwapError(ModelError):
    """A new adapter could not be applied in place; the model keeps the adapter it had."""


@dataclass(frozen=True)
class Adapter:
    """One adapter in memory: where it came from, its LoRA shape, its arrays."""

    path: Path | None
    config: dict[str, Any]
    weights: dict[str, mx.array]

    @property
    def structure(self) -> tuple[Any, ...]:
        # What the LoRA wrappers are built from; dropout is a no-op in eval mode.
        p = self.config["lora_parameters"]
        keys = tuple(sorted(p["keys"])) if p.get("keys") is not None else None
        return self.config.get("fine_tune_type", "lora"), self.config["num_layers"], p["rank"], p["scale"], keys


@dataclass(frozen=True)
class SwapResult:
    path: Path | None
    seconds: float
    restructured: bool  # the LoRA shape changed: layers were re-wrapped (base weights untouched)
    tensors: int


def read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json, checked for what an in-place swap needs."""
    try:
        config = json.loads((path / CONFIG).read_text())
        kind = config.get("fine_tune_type", "lora")
        if kind not in ("lora", "dora"):
            raise AdapterSwapError(
                f"{path}: fine_tune_type={kind!r} replaces base weights; only lora/dora "
                "adapters can be swapped in place (reload the model instead)"
            )
        params = config["lora_parameters"]
        complete = all(isinstance(v, (int, float)) for v in (config["num_layers"], params["rank"], params["scale"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise AdapterSwapError(f"{path / CONFIG} is missing or incomplete ({type(e).__name__}: {e})") from e
    if not complete:
        raise AdapterSwapError(f"{path / CONFIG}: num_layers, lora_parameters.rank and .scale must be numbers")
    return config


def read_adapter(path: Path | str) -> Adapter:
    """Verify (manifest, when the dir has one), read and evaluate an adapter; the model is not touched."""
    import mlx.core as mx

    path = Path(path)
    if (path / publisher.MANIFEST).is_file():
        try:
            publisher.verify(path)
        except PublishError as e:
            raise AdapterSwapError(f"{path} failed its checksum check: {e}") from e
    config = read_config(path)
    try:
        weights = mx.load(str(path / WEIGHTS))
        mx.eval(weights)
    except Exception as e:  # mx.load raises several types for a missing or truncated file
        raise AdapterSwapError(f"cannot read {path / WEIGHTS}: {type(e).__name__}: {e}") from e
    if not isinstance(weights, dict) or not weights:
        raise AdapterSwapError(f"{path / WEIGHTS} holds no named tensors")
    return Adapter(path, config, weights)


def _wrapper_types() -> tuple[type[nn.Module], ...]:
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return LoRALinear, LoRASwitchLinear, DoRALinear, LoRAEmbedding, DoRAEmbedding


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA/DoRA wrapper modules by dotted name (a walk over modules, not over every array)."""
    types = _wrapper_types()
    return {name: m for name, m in model.named_modules() if isinstance(m, types)}


def module_arrays(modules: dict[str, nn.Module]) -> dict[str, mx.array]:
    return {f"{name}.{leaf}": m[leaf] for name, m in modules.items() for leaf in ADAPTER_LEAVES if leaf in m}


def adapter_params(model: nn.Module) -> dict[str, mx.array]:
    """The model's current LoRA/DoRA arrays by dotted name (empty for a bare base model)."""
    return module_arrays(lora_modules(model))


def assign(modules: dict[str, nn.Module], weights: dict[str, mx.array]) -> None:
    """Put checked arrays into their wrappers (what load_weights does, without walking the base)."""
    for key, value in weights.items():
        name, leaf = key.rsplit(".", 1)
        modules[name][leaf] = value


def check_weights(weights: dict[str, mx.array], params: dict[str, mx.array], where: Path | None) -> None:
    """Every adapter parameter of the model must be replaced, by a tensor of its shape (one error for all)."""
    errors = [f"  {k}: not an adapter parameter of the model" for k in sorted(weights.keys() - params.keys())]
    errors += [f"  {k}: missing from the adapter file" for k in sorted(params.keys() - weights.keys())]
    errors += [
        f"  {k}: adapter shape {tuple(w.shape)} does not match model parameter shape {tuple(params[k].shape)}"
        for k, w in sorted(weights.items())
        if k in params and w.shape != params[k].shape
    ]
    if errors:
        raise AdapterSwapError(f"adapter {where} does not fit the loaded model:\n" + "\n".join(errors))


def strip_adapters(model: nn.Module) -> None:
    """Replace every LoRA/DoRA wrapper with the base layer it wraps (the base arrays are shared)."""
    from mlx.utils import tree_unflatten

    wrapped = [(name, m.linear if hasattr(m, "linear") else m.embedding) for name, m in lora_modules(model).items()]
    if wrapped:
        model.update_modules(tree_unflatten(wrapped))


def wrap_adapters(model: nn.Module, config: dict[str, Any]) -> None:
    """LoRA/DoRA wrappers as `config` describes them (what mlx_lm.load does with adapter_path)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    params = {"dropout": 0.0, **config["lora_parameters"]}
    linear_to_lora_layers(model, config["num_layers"], params, use_dora=config.get("fine_tune_type") == "dora")
    model.eval()


class AdapterSlot:
    """An mlx-lm model whose adapter is replaced in place, all or nothing.

    `adapter_path`: the adapter the model was loaded with (`mlx_lm.load(base, adapter_path=...)`);
    None for a bare base model (the first `apply` adds the LoRA layers once).
    """

    def __init__(self, model: nn.Module, adapter_path: Path | str | None = None):
        self.model = model
        self.current: Adapter | None = None
        self.previous: Adapter | None = None
        self._modules = lora_modules(model)  # walking a model costs ms: redone only on a re-wrap
        loaded = module_arrays(self._modules)
        if adapter_path is not None:
            self.current = Adapter(Path(adapter_path), read_config(Path(adapter_path)), loaded)
        elif loaded:
            raise AdapterSwapError(
                "the model already has LoRA layers: pass the adapter_path it was loaded with, "
                "e.g. AdapterSlot(model, adapter_path=...)"
            )

    def apply(self, path: Path | str) -> SwapResult:
        """Swap to the adapter in `path`; on any failure the previous adapter stays (AdapterSwapError)."""
        t0 = time.perf_counter()
        result = self._switch(read_adapter(path), t0)
        log.info("adapter_swapped", path=str(path), seconds=result.seconds, restructured=result.restructured)
        return result

    def install(self, adapter: Adapter | None) -> SwapResult:
        """Switch to an adapter already read (and verified) by `read_adapter`, or to the bare base
        (None): no disk I/O, so a server can hold every domain's adapter and switch in place."""
        return self._switch(adapter, time.perf_counter())

    def revert(self) -> SwapResult:
        """Back to the adapter that was active before the last successful `apply` (from memory)."""
        if self.previous is None:
            raise AdapterSwapError("no previous adapter to return to (nothing was applied over another one)")
        return self._switch(self.previous, time.perf_counter())

    def _switch(self, new: Adapter | None, t0: float) -> SwapResult:
        old = self._snapshot()
        if old is None and new is None:
            return SwapResult(None, time.perf_counter() - t0, False, 0)
        restructure = old is None or new is None or old.structure != new.structure
        try:
            self._install(new, restructure)
        except Exception as e:  # noqa: BLE001 - whatever failed, the old adapter goes back first
            self._restore(old, restructure)
            if isinstance(e, AdapterSwapError):
                raise
            raise AdapterSwapError(
                f"applying {self._name(new)} failed ({type(e).__name__}: {e}); kept {self._name(old)}"
            ) from e
        self.previous, self.current = old, new
        return SwapResult(
            None if new is None else new.path,
            time.perf_counter() - t0,
            restructure,
            0 if new is None else len(new.weights),
        )

    def _snapshot(self) -> Adapter | None:
        if self.current is None:
            return None
        return Adapter(self.current.path, self.current.config, module_arrays(self._modules))

    def _install(self, adapter: Adapter | None, restructure: bool) -> None:
        if restructure:
            strip_adapters(self.model)
            if adapter is not None:
                wrap_adapters(self.model, adapter.config)
            self._modules = lora_modules(self.model)
        if adapter is None:
            return
        check_weights(adapter.weights, module_arrays(self._modules), adapter.path)
        assign(self._modules, adapter.weights)  # arrays evaluated by read_adapter: nothing lazy left

    def _restore(self, old: Adapter | None, restructured: bool) -> None:
        if restructured:
            strip_adapters(self.model)
            if old is not None:
                wrap_adapters(self.model, old.config)
            self._modules = lora_modules(self.model)
        if old is not None:
            assign(self._modules, old.weights)
        log.warning("adapter_swap_rolled_back", kept=self._name(old))

    @staticmethod
    def _name(adapter: Adapter | None) -> str:
        return "the bare base model" if adapter is None else str(adapter.path or "the in-memory adapter")
