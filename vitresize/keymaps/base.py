"""What a key map is, and how one is matched against a state dict's keys and shapes. Pure Python."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Found", "KeyMap", "TensorInfo", "find_in"]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's shape and dtype (torch's name, e.g. ``"float32"``), known without reading its data."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class KeyMap:
    """Where one checkpoint family keeps its ViT embeddings, relative to the model's key prefix.

    Attributes:
        family: the name users pass to ``--family``.
        pos_embed: the position table, ``[1, prefix + H*W, D]``.
        patch_embed: the conv patch-embedding kernel, ``[D, C, ph, pw]``.
        tokens: prefix-token parameters whose rows lead the position table, in table order.
        native_method: the interpolation convention of the family's own library.
        no_embed_class: the table may leave the prefix tokens out (timm ``no_embed_class=True``).
        description: one line for docs and ``--help``.
    """

    family: str
    pos_embed: str
    patch_embed: str
    tokens: tuple[str, ...]
    native_method: str
    no_embed_class: bool = False
    description: str = ""


@dataclass(frozen=True)
class Found:
    """One ViT found in a state dict: its key prefix (e.g. ``module.``) and the keys that matter."""

    keymap: KeyMap
    prefix: str
    pos_key: str
    patch_key: str
    token_keys: tuple[str, ...]
    token_rows: int

    def prefix_candidates(self) -> tuple[int, ...]:
        """Prefix-row counts the evidence allows, most likely first."""
        if self.token_rows and self.keymap.no_embed_class:
            return (self.token_rows, 0)
        return (self.token_rows,)


def _rows(info: TensorInfo) -> int:
    """Rows a token parameter contributes: ``[1, R, D]`` -> R, ``[1, D]``/``[D]`` -> 1."""
    return info.shape[-2] if len(info.shape) >= 3 else 1


def find_in(tensors: Mapping[str, TensorInfo], keymap: KeyMap) -> tuple[list[Found], list[str]]:
    """All ViTs of ``keymap``'s layout in ``tensors``, under any key prefix.

    Returns:
        ``(found, near_misses)``: near misses are position keys of the right name whose patch kernel is
        missing or whose shapes do not fit, each with the reason, for error messages.
    """
    found: list[Found] = []
    misses: list[str] = []
    suffix = "." + keymap.pos_embed
    for key, info in tensors.items():
        if key != keymap.pos_embed and not key.endswith(suffix):
            continue
        prefix = key[: len(key) - len(keymap.pos_embed)]
        patch_key = prefix + keymap.patch_embed
        if len(info.shape) != 3 or info.shape[0] != 1:
            misses.append(f"{key} has shape {list(info.shape)}, not [1, tokens, dim]")
            continue
        patch = tensors.get(patch_key)
        if patch is None:
            misses.append(f"{key} has no patch kernel {patch_key}")
            continue
        if len(patch.shape) != 4:
            misses.append(f"{patch_key} has shape {list(patch.shape)}, not [dim, channels, ph, pw]")
            continue
        token_keys = tuple(prefix + t for t in keymap.tokens if prefix + t in tensors)
        rows = sum(_rows(tensors[k]) for k in token_keys)
        found.append(Found(keymap, prefix, key, patch_key, token_keys, rows))
    return found, misses
