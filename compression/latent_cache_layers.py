"""Cache layers for :mod:`compression.latent_cache`: what each key mode stores per token, and growth without copies.

Two key modes (``enable_latent_cache_(..., keys=...)``), values always latent:

- ``keys="latent"``: :class:`LatentCacheLayer` / :class:`LatentSlidingLayer`, ``keys`` = latents ``Z [B, 1, S, r]``,
  ``values`` = positions ``[B, 1, S, 1]`` (int64).  ``r`` numbers per token and layer; the keys are rebuilt
  from ``Z`` every step.
- ``keys="plain"``: :class:`PlainKeyLayer` / :class:`PlainKeySlidingLayer`, ``keys`` = the rotated keys
  ``[B, kv_heads, S, head_dim]`` (as the plain cache), ``values`` = latents ``Z [B, 1, S, r]``.
  ``kv_heads · head_dim + r`` numbers per token and layer; nothing is rebuilt over the prefix.

transformers' ``DynamicLayer`` appends with ``torch.cat``, which copies the whole cache every step (``S`` tokens
read and written per layer and step).  The full-attention layers here append into a buffer with spare capacity
(:class:`_Growing`): a step writes only its new tokens; the buffer grows by a quarter (at least 64 tokens),
so each token is copied O(1) times on average and at most ``S/4 + 64`` tokens of capacity are unused.
:class:`GrowingLayer` is the plain K/V cache with the same growth (what ``benchmarks/latent_cache_speed.py``
compares against, besides transformers' own).  Sliding-window layers keep transformers' behaviour (their
copy is bounded by the window).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

KEY_MODES = ("latent", "plain")


def _is_prefix_of(view: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """``view`` is ``buffer[..., :n, :]`` (so appending in place past ``n`` leaves it unchanged)."""
    return (buffer is not None and view.dim() == buffer.dim() and view.data_ptr() == buffer.data_ptr()
            and view.shape[:-2] == buffer.shape[:-2] and view.shape[-1] == buffer.shape[-1]
            and view.stride() == buffer.stride() and view.dtype == buffer.dtype)


class _Growing:
    """``update`` appends along dim -2 into ``_buffers`` with spare capacity instead of ``torch.cat``.

    ``keys`` / ``values`` stay views ``buffer[..., :S, :]``; when something outside replaced them (beam
    reordering, cropping to a copy, ``deepcopy``) the next append starts a fresh buffer from them.
    """

    def _append(self, slot: int, current: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        buffers = self.__dict__.setdefault("_buffers", [None, None])
        buffer = buffers[slot]
        if current.dim() != new.dim():  # DynamicLayer starts from torch.tensor([])
            current = new[..., :0, :]
        n, t = current.shape[-2], new.shape[-2]
        if not _is_prefix_of(current, buffer) or n + t > buffer.shape[-2]:
            capacity = n + t + max(64, (n + t) // 4)
            buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
            buffer[..., :n, :] = current
            buffers[slot] = buffer
        buffer[..., n:n + t, :] = new
        return buffer[..., :n + t, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._append(0, self.keys, key_states)
        self.values = self._append(1, self.values, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        self.__dict__.pop("_buffers", None)
        super().reset()


class GrowingLayer(_Growing, DynamicLayer):
    """The plain K/V cache layer (rotated keys, values) appending without ``torch.cat``."""


class _Latent:
    """``keys="latent"``: latents in ``keys``, int64 positions in ``values``."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros(*key_states.shape[:2], 0, key_states.shape[-1], dtype=key_states.dtype,
                                device=key_states.device)
        self.values = torch.zeros(*value_states.shape[:2], 0, 1, dtype=torch.long, device=key_states.device)
        if hasattr(self, "_sliding_window_tensor"):
            self._sliding_window_tensor = self._sliding_window_tensor.to(self.device)
        self.is_initialized = True

    def update_latent(self, latent: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``latent [B, T, r]`` and ``positions [B, T]``; return the visible ``[B, S, r]``, ``[B, S]``."""
        keys, values = self.update(latent[:, None], positions[:, None, :, None])
        return keys[:, 0], values[:, 0, :, 0]

    def nbytes_per_token(self) -> int:
        """Stored bytes per token (all batch rows together): latent plus the int64 position."""
        if not self.is_initialized:
            return 0
        return self.keys.shape[0] * (self.keys.shape[-1] * self.keys.element_size() + 8)


class LatentCacheLayer(_Latent, _Growing, DynamicLayer):
    """``keys``: latents ``[B, 1, S, r]`` (model dtype); ``values``: positions ``[B, 1, S, 1]`` (int64)."""


class LatentSlidingLayer(_Latent, DynamicSlidingWindowLayer):
    """As :class:`LatentCacheLayer`, keeping the last ``sliding_window - 1`` tokens like the plain sliding cache."""


class _PlainKeys:
    """``keys="plain"``: rotated keys in ``keys``, latents in ``values``."""

    def update_keys_latent(self, key: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append rotated ``key [B, G, T, d]`` and ``latent [B, T, r]``; return ``[B, G, S, d]``, ``[B, S, r]``."""
        keys, values = self.update(key, latent[:, None])
        return keys, values[:, 0]

    def nbytes_per_token(self) -> int:
        """Stored bytes per token (all batch rows together): rotated keys plus the latent."""
        if not self.is_initialized or self.keys.dim() != 4:
            return 0
        size = self.keys.element_size()
        return self.keys.shape[0] * size * (self.keys.shape[1] * self.keys.shape[-1] + self.values.shape[-1])


class PlainKeyLayer(_PlainKeys, _Growing, DynamicLayer):
    """``keys``: rotated keys ``[B, kv_heads, S, head_dim]``; ``values``: latents ``[B, 1, S, r]``."""


class PlainKeySlidingLayer(_PlainKeys, DynamicSlidingWindowLayer):
    """As :class:`PlainKeyLayer`, keeping the last ``sliding_window - 1`` tokens like the plain sliding cache."""


_KINDS = {"latent": (_Latent, LatentCacheLayer, LatentSlidingLayer),
          "plain": (_PlainKeys, PlainKeyLayer, PlainKeySlidingLayer)}


def latent_layer(cache, layer_idx: int, keys: str):
    """The cache's entry for ``layer_idx`` as a layer of key mode ``keys`` (swapping in a fresh one of the
    same kind: full attention or sliding window)."""
    kind, full, sliding = _KINDS[keys]
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(cache.layers) <= layer_idx:
            cache.layers.append(full())
    layer = cache.layers[layer_idx]
    if isinstance(layer, kind):
        return layer
    if type(layer) in (DynamicLayer, GrowingLayer) and not layer.is_initialized:
        cache.layers[layer_idx] = full()
    elif type(layer) is DynamicSlidingWindowLayer and not layer.is_initialized:
        cache.layers[layer_idx] = sliding(sliding_window=layer.sliding_window)
    else:
        raise TypeError(f"layer {layer_idx} of the cache is a {type(layer).__name__} already in use; the latent "
                        f"KV cache (keys={keys!r}) needs a fresh DynamicCache (no static, offloaded or quantized "
                        "cache, no cache filled with another key mode)")
    return cache.layers[layer_idx]


__all__ = ["KEY_MODES", "GrowingLayer", "LatentCacheLayer", "LatentSlidingLayer", "PlainKeyLayer",
           "PlainKeySlidingLayer", "latent_layer"]
