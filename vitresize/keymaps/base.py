"""What a key map is, and how one is matched against a state dict's keys and shapes. Pure Python."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Found",
    "KeyMap",
    "PatchLayout",
    "PosLayout",
    "TensorInfo",
    "find_in",
    "kernel_shape",
    "kernel_size",
    "pos_rows",
    "pos_shape",
    "token_rows",
]


# Layouts: a position table is "1LD" ([1, rows, D]) or "LD" ([rows, D], CLIP); a patch kernel is "OIHW"
# (torch) or "HWIO" (JAX).


PosLayout = Literal["1LD", "LD"]
"""A position table's layout: ``[1, rows, dim]`` (``1LD``), or ``[rows, dim]`` (``LD``: CLIP)."""
PatchLayout = Literal["OIHW", "HWIO"]
"""A patch kernel's layout: torch's ``[dim, channels, ph, pw]`` (``OIHW``), or JAX's ``[ph, pw, channels, dim]``."""


def pos_rows(shape: tuple[int, ...], layout: PosLayout) -> int | None:
    """Rows of a position table of this layout, or ``None`` if the shape is not one."""
    if layout == "LD":
        return shape[0] if len(shape) == 2 else None
    return shape[1] if len(shape) == 3 and shape[0] == 1 else None


def pos_shape(rows: int, dim: int, layout: PosLayout) -> tuple[int, ...]:
    """The shape of a position table of this layout."""
    return (rows, dim) if layout == "LD" else (1, rows, dim)


def kernel_size(shape: tuple[int, ...], layout: PatchLayout) -> tuple[int, int]:
    """``(ph, pw)`` of a patch kernel of this layout."""
    return (shape[0], shape[1]) if layout == "HWIO" else (shape[-2], shape[-1])


def kernel_shape(shape: tuple[int, ...], patch: tuple[int, int], layout: PatchLayout) -> tuple[int, ...]:
    """A kernel's shape at another patch size."""
    return (*patch, *shape[2:]) if layout == "HWIO" else (*shape[:2], *patch)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's shape and dtype (torch's name, e.g. ``"float32"``), known without reading its data."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class KeyMap:
    """Where one checkpoint family keeps its ViT embeddings, relative to the model's key prefix.

    Attributes:
        family: the name users pass to ``--family``.
        pos_embed: the position table, ``[1, prefix + H*W, D]`` (``pos_layout="LD"``: ``[prefix + H*W, D]``).
        patch_embed: the conv patch-embedding kernel, ``[D, C, ph, pw]`` (``patch_layout="HWIO"``:
            ``[ph, pw, C, D]``, as JAX stores it).
        tokens: prefix-token parameters whose rows lead the position table, in table order. Tokens that live
            outside the table (DINOv2 registers, a big_vision class token) are not listed.
        native_method: the interpolation convention of the family's own library.
        no_embed_class: the table may leave the prefix tokens out (timm ``no_embed_class=True``).
        sep: the separator of key paths (``/`` in JAX ``.npz`` files).
        requires: keys that must exist beside the table for the map to apply (tells apart families that
            share key names, e.g. DINOv2's ``mask_token``).
        native_when: ``(key, method)``: a key whose presence selects another native method (HF DINOv2 with
            registers antialiases, without it does not).
        position_ids: an integer buffer ``[1, rows]`` that counts the table's rows (older HF CLIP files); it
            is rewritten to count the new rows.
        stems: ``(pattern, what)``: a key (a regular expression matched at the start of the key below the model
            prefix) that shows the patch kernel is not the patch, because a stem runs before it (a hybrid's CNN)
            or the kernel is strided otherwise (Hiera's 7x7 stride-4 conv). The table's grid is then
            image / stride, and the stride cannot be read from the weights. ``what`` names it, ``{key}`` the key.
        unsupported: ``(pattern, why)``: a key that marks a model of this layout whose table vitresize must
            not resample; ``why`` says so (``{key}``: the key), and what to do instead.
    """

    family: str
    pos_embed: str
    patch_embed: str
    tokens: tuple[str, ...]
    native_method: str
    no_embed_class: bool = False
    sep: str = "."
    pos_layout: PosLayout = "1LD"
    patch_layout: PatchLayout = "OIHW"
    requires: tuple[str, ...] = ()
    native_when: tuple[tuple[str, str], ...] = ()
    position_ids: str | None = None
    stems: tuple[tuple[str, str], ...] = ()
    unsupported: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Found:
    """One ViT found in a state dict: its key prefix (e.g. ``module.``) and the keys that matter.

    ``stem``: why the patch kernel is not the patch (what runs before it, and the key that shows it), or
    ``None`` for a plain ViT, whose patch is its kernel. ``unsupported``: why this table must not be
    resampled, or ``None``.
    """

    keymap: KeyMap
    prefix: str
    pos_key: str
    patch_key: str
    token_keys: tuple[str, ...]
    token_rows: int
    stem: str | None = None
    unsupported: str | None = None

    def native_method(self, tensors: Mapping[str, TensorInfo]) -> str:
        """The family's own convention for this model (some depend on which tokens it has)."""
        for key, method in self.keymap.native_when:
            if self.prefix + key in tensors:
                return method
        return self.keymap.native_method

    def prefix_candidates(self) -> tuple[int, ...]:
        """Prefix-row counts the evidence allows, most likely first."""
        if self.token_rows and self.keymap.no_embed_class:
            return (self.token_rows, 0)
        return (self.token_rows,)


def token_rows(info: TensorInfo) -> int:
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
    suffix = keymap.sep + keymap.pos_embed
    for key, info in tensors.items():
        if key != keymap.pos_embed and not key.endswith(suffix):
            continue
        prefix = key[: len(key) - len(keymap.pos_embed)]
        if any(prefix + r not in tensors for r in keymap.requires):
            continue
        patch_key = prefix + keymap.patch_embed
        if pos_rows(info.shape, keymap.pos_layout) is None:
            want = "[tokens, dim]" if keymap.pos_layout == "LD" else "[1, tokens, dim]"
            misses.append(f"{key} has shape {list(info.shape)}, not {want}")
            continue
        patch = tensors.get(patch_key)
        if patch is None:
            misses.append(f"{key} has no patch kernel {patch_key}")
            continue
        if len(patch.shape) != 4:
            want = "[ph, pw, channels, dim]" if keymap.patch_layout == "HWIO" else "[dim, channels, ph, pw]"
            misses.append(f"{patch_key} has shape {list(patch.shape)}, not {want}")
            continue
        if 0 in patch.shape or 0 in info.shape:
            empty = patch_key if 0 in patch.shape else key
            misses.append(f"{empty} has a zero-size dimension ({list(tensors[empty].shape)}), so it holds no weights")
            continue
        token_keys = tuple(prefix + t for t in keymap.tokens if prefix + t in tensors)
        rows = sum(token_rows(tensors[k]) for k in token_keys)
        stem = _marked(tensors, prefix, keymap.stems)
        unsupported = _marked(tensors, prefix, keymap.unsupported)
        found.append(Found(keymap, prefix, key, patch_key, token_keys, rows, stem, unsupported))
    return found, misses


def _marked(tensors: Mapping[str, TensorInfo], prefix: str, marks: tuple[tuple[str, str], ...]) -> str | None:
    """The text of the first mark whose pattern matches a key below ``prefix`` (its ``{key}`` filled), or ``None``."""
    for pattern, text in marks:
        rx = re.compile(re.escape(prefix) + pattern)
        key = next((k for k in tensors if rx.match(k)), None)
        if key is not None:
            return text.format(key=key)
    return None
