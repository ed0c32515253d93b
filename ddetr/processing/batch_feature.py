"""The dict returned by the image processors: attribute access and ``.to()``, like transformers' ``BatchFeature``."""

from __future__ import annotations

from typing import Any

import torch


def _move(value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if isinstance(value, torch.Tensor):
        # A dtype cast applies to floating tensors only: masks, labels and sizes must stay integer.
        is_cast = any(isinstance(arg, torch.dtype) for arg in args) or "dtype" in kwargs
        if is_cast and not value.is_floating_point():
            device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
            return value.to(device) if device is not None else value
        return value.to(*args, **kwargs)
    if isinstance(value, dict):
        return type(value)({key: _move(item, args, kwargs) for key, item in value.items()})
    if isinstance(value, list):
        return [_move(item, args, kwargs) for item in value]
    return value


class BatchFeature(dict):
    """Model inputs by name (``pixel_values``, ``pixel_mask``, ``labels``), usable as ``model(**batch)``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; fields: {sorted(self)}") from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move every tensor (labels included) to a device and/or cast floating tensors to a dtype, in place."""
        for key, value in list(self.items()):
            self[key] = _move(value, args, kwargs)
        return self
