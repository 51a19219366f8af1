"""What a key map is, and how one is matched against a state dict's keys and shapes. Pure Python."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Found",
    "KeyMap",
    "PatchLayout",
    "PosLayout",
    "Rule",
    "RuleOp",
    "Scheme",
    "TensorInfo",
    "find_in",
    "kernel_shape",
    "kernel_size",
    "pos_grid",
    "pos_rows",
    "pos_shape",
    "token_rows",
]


# Layouts: a position table is "1LD" ([1, rows, D]), "LD" ([rows, D], CLIP), "1HWD" ([1, H, W, D], SAM, VOLO)
# or "1DHW" ([1, D, H, W], PiT, Visformer); a patch kernel is "OIHW" (torch) or "HWIO" (JAX).


PosLayout = Literal["1LD", "LD", "1HWD", "1DHW"]
"""A position table's layout: ``[1, rows, dim]`` (``1LD``), ``[rows, dim]`` (``LD``: CLIP), or a grid kept as
one: ``[1, H, W, dim]`` (``1HWD``: SAM, VOLO) or ``[1, dim, H, W]`` (``1DHW``: PiT, Visformer). Grid layouts hold
no prefix rows."""
GRID_LAYOUTS: tuple[PosLayout, ...] = ("1HWD", "1DHW")
RuleOp = Literal[
    "abs_table", "rel_bias", "rel_pos_1d", "rel_index", "position_ids", "attn_bias", "hf_rel_bias", "nest_table"
]
"""What a :class:`Rule` does to its tensors: resample another absolute table (``abs_table``: a later stage's,
a second branch's; ``nest_table``: NesT's block tables), a 2-D relative position bias table (``rel_bias``, timm's
recipe; ``hf_rel_bias``, transformers' run-time one) or a 1-D one (``rel_pos_1d``), an attention-bias table
(``attn_bias``: LeViT's ``[heads, h*w]``), regenerate a ``relative_position_index`` buffer (``rel_index``), or
recount an integer ``position_ids`` buffer (``position_ids``)."""
BIAS_TABLE_OPS: tuple[RuleOp, ...] = ("rel_bias", "hf_rel_bias")
"""Ops of 2-D relative bias tables ``[(2h-1)(2w-1) + extra, heads]`` (or ``[heads, 2h-1, 2w-1]``)."""
RELATIVE_OPS: tuple[RuleOp, ...] = (*BIAS_TABLE_OPS, "rel_pos_1d", "attn_bias")
"""Ops of relative tables: the ones a model's grid or window can be read from."""
Scheme = Literal["absolute", "relative", "rotary", "sincos", "conditional", "runtime", "none"]
"""How a family encodes positions: an absolute table, relative tables (or biases), rotary embeddings, sin-cos
features computed at run time, a conditional (convolutional) encoding, a table the model resamples itself at run
time, or none."""
PatchLayout = Literal["OIHW", "HWIO"]
"""A patch kernel's layout: torch's ``[dim, channels, ph, pw]`` (``OIHW``), or JAX's ``[ph, pw, channels, dim]``."""


def pos_rows(shape: tuple[int, ...], layout: PosLayout) -> int | None:
    """Rows of a position table of this layout (``H*W`` for a grid layout), or ``None`` if the shape is not one."""
    if layout == "LD":
        return shape[0] if len(shape) == 2 else None
    if layout in GRID_LAYOUTS:
        grid = pos_grid(shape, layout) if len(shape) == 4 and shape[0] == 1 else None
        return grid[0] * grid[1] if grid is not None else None
    return shape[1] if len(shape) == 3 and shape[0] == 1 else None


def pos_grid(shape: tuple[int, ...], layout: PosLayout) -> tuple[int, int] | None:
    """The grid a table of a grid layout holds (``None`` for a layout of rows)."""
    if layout == "1HWD":
        return (shape[1], shape[2])
    if layout == "1DHW":
        return (shape[2], shape[3])
    return None


def pos_shape(rows: int, dim: int, layout: PosLayout, grid: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The shape of a position table of this layout (a grid layout needs the ``grid``)."""
    if layout in GRID_LAYOUTS:
        assert grid is not None
        return (1, *grid, dim) if layout == "1HWD" else (1, dim, *grid)
    return (rows, dim) if layout == "LD" else (1, rows, dim)


def kernel_size(shape: tuple[int, ...], layout: PatchLayout) -> tuple[int, int]:
    """``(ph, pw)`` of a patch kernel of this layout."""
    return (shape[0], shape[1]) if layout == "HWIO" else (shape[-2], shape[-1])


def kernel_shape(shape: tuple[int, ...], patch: tuple[int, int], layout: PatchLayout) -> tuple[int, ...]:
    """A kernel's shape at another patch size."""
    return (*patch, *shape[2:]) if layout == "HWIO" else (*shape[:2], *patch)


@dataclass(frozen=True)
class Rule:
    """A tensor besides the position table and the patch kernel that is tied to the grid or the window.

    Attributes:
        pattern: a regular expression that matches the whole key below the model prefix.
        op: what a new geometry does to it (:data:`RuleOp`).
        span: what the table spans: the whole patch grid (``"grid"``: BEiT, SAM's global attention), or the
            attention window (``"window"``: Swin, changed by ``--window``).
        layout: of a ``rel_bias`` table: ``"LH"`` (``[(2h-1)(2w-1) + extra_rows, heads]``) or ``"HLL"``
            (``[heads, 2h-1, 2w-1]``, MaxViT); of a ``rel_pos_1d`` table: ``"LD"`` (``[2n-1, dim]``); of an
            ``abs_table``: a :data:`PosLayout`.
        extra_rows: rows that are not positions, kept as they are: after a relative table's (BEiT's three class
            rows), before an ``abs_table``'s grid (its prefix rows).
        axis: the axis a ``rel_pos_1d`` table runs along (0: height, 1: width).
    """

    pattern: str
    op: RuleOp
    span: Literal["grid", "window"] = "grid"
    layout: str = "LH"
    extra_rows: int = 0
    axis: int = 0
    stage: bool = False
    """The pattern's first group is a stage index ``s``: the window is clamped to the stage's grid,
    ``ceil(grid / 2**s)``, where that is smaller (timm's Swin)."""
    scale: bool = False
    """For a ``"window"`` rule whose stages use multiples of the model's window (TinyViT's 7, 7, 14, 7): a new
    window scales each table's window by new / old (it must come out whole)."""
    size: Callable[[str, tuple[int, int], tuple[int, int]], tuple[int, int]] | None = None
    """For a ``"grid"`` rule whose tensor spans not the model's grid but one derived from it (a later stage's
    table, a second branch's): called with the key below the prefix, the model's grid and its patch, it gives the
    grid (or window) the tensor spans."""

    def stage_grid(self, key: str, grid: tuple[int, int]) -> tuple[int, tuple[int, int]] | None:
        """``(s, ceil(grid / 2**s))``: the stage of this rule's tensor ``key`` (below the prefix) and its grid, or
        ``None`` for a rule without stages."""
        m = re.fullmatch(self.pattern, key) if self.stage else None
        if m is None:
            return None
        s = int(m.group(1))
        return s, (-(-grid[0] >> s), -(-grid[1] >> s))

    def stage_window(self, key: str, window: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        """The window this rule's tensor ``key`` (below the prefix) spans for a model ``window`` at ``grid``."""
        staged = self.stage_grid(key, grid)
        if staged is None:
            return window
        stage = staged[1]
        return (min(window[0], stage[0]), min(window[1], stage[1]))

    def matches(self, key: str) -> bool:
        """Whether ``key`` (below the model prefix) is one of this rule's tensors."""
        return re.fullmatch(self.pattern, key) is not None

    def shape_for(self, shape: tuple[int, ...], size: tuple[int, int], rows: int = 0) -> tuple[int, ...] | None:
        """The shape of this rule's tensor (now ``shape``) for a grid or window of ``size``; ``rows``: the new
        row count of the model's position table (``position_ids``). ``None`` if ``shape`` is not this rule's."""
        h, w = size
        if self.op == "abs_table":
            if self.layout in GRID_LAYOUTS and len(shape) == 4:
                return (1, h, w, shape[3]) if self.layout == "1HWD" else (1, shape[1], h, w)
            if self.layout == "LD" and len(shape) == 2:
                return (self.extra_rows + h * w, shape[1])
            return (1, self.extra_rows + h * w, shape[2]) if self.layout == "1LD" and len(shape) == 3 else None
        if self.op in BIAS_TABLE_OPS and self.layout == "HLL":
            return (shape[0], 2 * h - 1, 2 * w - 1) if len(shape) == 3 else None
        if self.op in BIAS_TABLE_OPS:
            return ((2 * h - 1) * (2 * w - 1) + self.extra_rows, shape[1]) if len(shape) == 2 else None
        if self.op == "rel_pos_1d":
            return (2 * size[self.axis] - 1, shape[1]) if len(shape) == 2 else None
        if self.op == "rel_index":
            if len(shape) != 2 or shape[0] != shape[1]:
                return None
            n = h * w + self.extra_rows
            return (n, n)
        if self.op == "attn_bias":  # LeViT's [heads, h*w]: a bias per head and per offset (|dy|, |dx|)
            return (shape[0], h * w) if len(shape) == 2 else None
        return (1, rows) if len(shape) == 2 and shape[0] == 1 else None

    def spans(self, shape: tuple[int, ...], size: tuple[int, int]) -> bool:
        """Whether a tensor of ``shape`` is this rule's for a grid or window of ``size``."""
        return self.op != "position_ids" and self.shape_for(shape, size) == tuple(shape)

    def square_span(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The square grid or window a tensor of ``shape`` spans, if it is this rule's for one."""
        if self.op == "abs_table":
            grid = pos_grid(shape, self.layout) if self.layout in GRID_LAYOUTS else None
            rows = shape[-2] if len(shape) >= 2 else 0
            side = math.isqrt(max(rows - self.extra_rows, 0))
            found = grid or (side, side)
            return found if self.spans(shape, found) else None
        if self.op == "attn_bias":  # a table of a derived resolution (``size``) does not tell the model's
            side = math.isqrt(shape[1]) if len(shape) == 2 and self.size is None else 0
            return (side, side) if side and side * side == shape[1] else None
        if self.op in BIAS_TABLE_OPS and self.layout == "HLL" and len(shape) == 3:
            n = shape[1]
        elif self.op in BIAS_TABLE_OPS and len(shape) == 2:
            n = math.isqrt(max(shape[0] - self.extra_rows, 0))
        elif self.op == "rel_pos_1d" and len(shape) == 2:
            n = shape[0]
        elif self.op == "rel_index" and len(shape) == 2:
            n = 2 * math.isqrt(max(shape[0] - self.extra_rows, 0)) - 1
        else:
            return None
        side = (n + 1) // 2
        return (side, side) if n % 2 == 1 and self.spans(shape, (side, side)) else None


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
    """Where one checkpoint family keeps the tensors tied to its geometry, relative to the model's key prefix.

    Attributes:
        family: the name users pass to ``--family``.
        pos_embed: the absolute position table (``[1, prefix + H*W, D]``, or another :data:`PosLayout`), or
            ``None`` for a family without one (rotary, relative, conditional encodings).
        patch_embed: the conv patch-embedding kernel, ``[D, C, ph, pw]`` (``patch_layout="HWIO"``:
            ``[ph, pw, C, D]``, as JAX stores it). A family without ``pos_embed`` is found by this key.
        tokens: prefix-token parameters whose rows lead the position table, in table order. Tokens that live
            outside the table (DINOv2 registers, a big_vision class token) are not listed.
        native_method: the interpolation convention of the family's own library.
        no_embed_class: the table may leave the prefix tokens out (timm ``no_embed_class=True``).
        sep: the separator of key paths (``/`` in JAX ``.npz`` files).
        requires: keys that must exist beside the table for the map to apply (tells apart families that
            share key names, e.g. DINOv2's ``mask_token``).
        markers: regular expressions (matched at the start of a key below the prefix) that must each match a
            key for the map to apply; ``forbids``: ones that must match none.
        native_when: ``(key, method)``: a key whose presence selects another native method (HF DINOv2 with
            registers antialiases, without it does not).
        rules: the other tensors tied to the grid or the window (:class:`Rule`): relative tables, their index
            buffers, ``position_ids``.
        scheme: how the family encodes positions (:data:`Scheme`); ``scheme_note`` says, for users, what that
            means for a new image size (why nothing changes, where the model resamples itself).
        window: the family's tables span an attention window that ``--window`` sets (Swin).
        stems: ``(pattern, what)``: a key (a regular expression matched at the start of the key below the model
            prefix) that shows the patch kernel is not the patch, because a stem runs before it (a hybrid's CNN)
            or the kernel is strided otherwise (Hiera's 7x7 stride-4 conv). The table's grid is then
            image / stride, and the stride cannot be read from the weights. ``what`` names it, ``{key}`` the key.
        fixed_patch: why ``--patch`` cannot change this family's patch (several kernels, a conv stem), or ``None``.
        unsupported: ``(pattern, why)``: a key that marks a model of this layout whose table vitresize must
            not resample; ``why`` says so (``{key}``: the key), and what to do instead.
    """

    family: str
    pos_embed: str | None
    patch_embed: str
    tokens: tuple[str, ...]
    native_method: str
    no_embed_class: bool = False
    sep: str = "."
    pos_layout: PosLayout = "1LD"
    patch_layout: PatchLayout = "OIHW"
    requires: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    forbids: tuple[str, ...] = ()
    native_when: tuple[tuple[str, str], ...] = ()
    rules: tuple[Rule, ...] = ()
    scheme: Scheme = "absolute"
    scheme_note: str = ""
    window: bool = False
    stems: tuple[tuple[str, str], ...] = ()
    fixed_patch: str | None = None
    unsupported: tuple[tuple[str, str], ...] = ()
    pos_optional: bool = False
    """The family is found by its kernel, and ``pos_embed`` is used where a model has one (BEiT's variants)."""
    linear_patch: bool = False
    """The patch embedding is a linear layer ``[dim, ph * pw * channels]`` (NaFlexViT), not a conv kernel."""
    fixed_grid: str | None = None
    """Why this family's grid cannot change (a stage that attends over a fixed grid), or ``None``."""
    stride: Callable[[Mapping[str, TensorInfo], str], int | None] | None = None
    """The family's patch read from its keys (called with the state dict and the model prefix) where it is not
    the kernel's size: a stem of stride-2 convolutions (XCiT), a hybrid's CNN; ``None`` from it: unknown."""
    untied: tuple[str, ...] = ()
    """Regular expressions (matched at the start of a key below the prefix) of keys that look positional but
    do not depend on the grid (vit_relpos's ``rel_pos.mlp``, XCiT's Fourier ``pos_embed.token_projection``)."""
    check_target: Callable[[tuple[int, int], tuple[int, int], tuple[int, int] | None], str | None] | None = None
    """Why the library cannot build the model at a target (called with its grid, ``(0, 0)`` when not known, its
    patch and its window), or ``None`` from it when it can: sizes a stage cannot divide, a window the library
    takes as one int."""
    grid: Callable[[Mapping[str, TensorInfo], str], tuple[int, int] | None] | None = None
    """The source grid read from the keys (called with the state dict and the model prefix), for a family
    without a main table whose tied tables state it in a way no rule reads (NesT: level 0's blocks x tokens);
    ``None`` from it: unknown."""

    @property
    def anchor(self) -> str:
        """The key a model of this family is found by: its position table, else (or when the table is optional)
        its patch kernel."""
        return self.pos_embed if self.pos_embed is not None and not self.pos_optional else self.patch_embed


@dataclass(frozen=True)
class Found:
    """One model found in a state dict: its key prefix (e.g. ``module.``) and the keys that matter.

    ``pos_key`` is ``None`` for a family without an absolute table. ``tied``: the keys of the other tensors
    tied to the geometry, each with its :class:`Rule`. ``stem``: why the patch kernel is not the patch (what runs
    before it, and the key that shows it), or ``None`` for a plain ViT, whose patch is its kernel.
    ``unsupported``: why this table must not be resampled, or ``None``.
    """

    keymap: KeyMap
    prefix: str
    pos_key: str | None
    patch_key: str
    token_keys: tuple[str, ...]
    token_rows: int
    stem: str | None = None
    unsupported: str | None = None
    tied: tuple[tuple[str, Rule], ...] = ()

    @property
    def anchor_key(self) -> str:
        """The key the model was found by (its table, else its kernel), for messages."""
        return self.pos_key if self.pos_key is not None else self.patch_key

    def native_method(self, tensors: Mapping[str, TensorInfo]) -> str:
        """The family's own convention for this model (some depend on which tokens it has)."""
        for key, method in self.keymap.native_when:
            if self.prefix + key in tensors:
                return method
        return self.keymap.native_method

    def prefix_candidates(self) -> tuple[int, ...]:
        """Prefix-row counts the evidence allows, most likely first."""
        if self.keymap.pos_layout in GRID_LAYOUTS:
            return (0,)
        if self.token_rows and self.keymap.no_embed_class:
            return (self.token_rows, 0)
        return (self.token_rows,)


def token_rows(info: TensorInfo) -> int:
    """Rows a token parameter contributes: ``[1, R, D]`` -> R, ``[1, D]``/``[D]`` -> 1."""
    return info.shape[-2] if len(info.shape) >= 3 else 1


def find_in(
    tensors: Mapping[str, TensorInfo],
    keymap: KeyMap,
    tables: tuple[str, ...] = (),
    kernels: tuple[str, ...] = (),
) -> tuple[list[Found], list[str]]:
    """All models of ``keymap``'s layout in ``tensors``, under any key prefix.

    A model's keys are the ones below its prefix, less those of another model nested under a longer prefix (a
    ``teacher.`` copy): one with a position table (a name in ``tables``) and a patch kernel (in ``kernels``).

    Returns:
        ``(found, near_misses)``: near misses are position keys of the right name whose patch kernel is
        missing or whose shapes do not fit, each with the reason, for error messages.
    """
    found: list[Found] = []
    misses: list[str] = []
    anchor = keymap.anchor
    suffix = keymap.sep + anchor
    for key in tensors:
        if key != anchor and not key.endswith(suffix):
            continue
        prefix = key[: len(key) - len(anchor)]
        if any(prefix + r not in tensors for r in keymap.requires):
            continue
        below = _below(tensors, prefix, (*tables, anchor), (*kernels, keymap.patch_embed), keymap.sep)
        if not all(any(re.match(m, k) for k in below) for m in keymap.markers):
            continue
        if any(re.match(m, k) for m in keymap.forbids for k in below):
            continue
        patch_key = prefix + keymap.patch_embed
        pos_key = key if keymap.pos_embed is not None and not keymap.pos_optional else None
        if keymap.pos_optional and keymap.pos_embed is not None and prefix + keymap.pos_embed in tensors:
            pos_key = prefix + keymap.pos_embed
        pos_info = tensors[pos_key] if pos_key is not None else None
        if pos_key is not None and pos_info is not None and pos_rows(pos_info.shape, keymap.pos_layout) is None:
            misses.append(f"{pos_key} has shape {list(pos_info.shape)}, not {_LAYOUT_TEXT[keymap.pos_layout]}")
            continue
        patch = tensors.get(patch_key)
        if patch is None:
            misses.append(f"{key} has no patch kernel {patch_key}")
            continue
        if len(patch.shape) != 4 and not (keymap.linear_patch and len(patch.shape) == 2):
            want = "[ph, pw, channels, dim]" if keymap.patch_layout == "HWIO" else "[dim, channels, ph, pw]"
            misses.append(f"{patch_key} has shape {list(patch.shape)}, not {want}")
            continue
        if 0 in patch.shape or (pos_info is not None and 0 in pos_info.shape):
            empty = patch_key if 0 in patch.shape or pos_key is None else pos_key
            misses.append(f"{empty} has a zero-size dimension ({list(tensors[empty].shape)}), so it holds no weights")
            continue
        token_keys = tuple(prefix + t for t in keymap.tokens if prefix + t in tensors)
        rows = sum(token_rows(tensors[k]) for k in token_keys)
        stem = _marked(tensors, prefix, keymap.stems)
        unsupported = _marked(tensors, prefix, keymap.unsupported)
        tied = tuple((prefix + k, r) for k in below for r in keymap.rules if r.matches(k))
        hollow = next((k for k, _ in tied if 0 in tensors[k].shape), None)
        if unsupported is None and hollow is not None:
            unsupported = f"{hollow} has a zero-size dimension ({list(tensors[hollow].shape)}), so it holds no weights"
        if unsupported is None:
            unsupported = _unknown_positional(below, prefix, keymap, {k for k, _ in tied} | {key, pos_key or key})
        found.append(Found(keymap, prefix, pos_key, patch_key, token_keys, rows, stem, unsupported, tied))
    return found, misses


def _below(
    tensors: Mapping[str, TensorInfo], prefix: str, tables: tuple[str, ...], kernels: tuple[str, ...], sep: str
) -> list[str]:
    """The keys of the model at ``prefix``, relative to it: those of models nested deeper (a table and a kernel
    under a longer prefix) left out."""
    keys = [k[len(prefix) :] for k in tensors if k.startswith(prefix)]
    suffixes = tuple(sep + t for t in tables)
    candidates = [k for k in keys if k.endswith(suffixes)]  # one C call a key: this runs per family and prefix
    if not candidates:
        return keys
    present = set(keys)
    nested = set()
    for k in candidates:
        for t in tables:
            n = k[: len(k) - len(t)]
            if k.endswith(sep + t) and n and any(n + kern in present for kern in kernels):
                nested.add(n)
    if not nested:
        return keys
    return [k for k in keys if not any(k.startswith(n) for n in nested)]


_LAYOUT_TEXT = {"1LD": "[1, tokens, dim]", "LD": "[tokens, dim]", "1HWD": "[1, H, W, dim]", "1DHW": "[1, dim, H, W]"}


def square_window(library: str) -> Callable[[tuple[int, int], tuple[int, int], tuple[int, int] | None], str | None]:
    """A :attr:`KeyMap.check_target` for a ``library`` that takes its window as one int: a non-square one is
    refused."""

    def check(grid: tuple[int, int], patch: tuple[int, int], window: tuple[int, int] | None) -> str | None:
        if window is not None and window[0] != window[1]:
            return f"{library} takes one window size (an int), not {window[0]}x{window[1]}; give --window N"
        return None

    return check


POSITIONAL = re.compile(
    r"(^|[./_])(pos_?embed\w*|posembed\w*|pos_embedding|position_embeddings?|positional_embedding|"
    r"relative_position\w*|rel_pos\w*|attention_bias\w*|attn_mask|position_ids|patch_pos|pixel_pos|rope\w*)"
    r"($|[./])",
    re.IGNORECASE,
)
"""Key names that suggest a tensor tied to positions: one no rule of the family covers makes its model refused,
not converted as if it were not there."""


def _unknown_positional(below: list[str], prefix: str, keymap: KeyMap, covered: set[str]) -> str | None:
    """Why a model is refused when a key below ``prefix`` looks positional and no rule of ``keymap`` covers it."""
    for k in below:
        if (
            prefix + k not in covered
            and POSITIONAL.search(k)
            and not any(re.match(u, k) for u in keymap.untied)
            and k not in keymap.tokens
        ):
            return (
                f"{prefix + k} looks tied to positions, and vitresize does not know how the {keymap.family} "
                f"layout uses it; it is refused rather than converted without it (please report the model)"
            )
    return None


def _marked(tensors: Mapping[str, TensorInfo], prefix: str, marks: tuple[tuple[str, str], ...]) -> str | None:
    """The text of the first mark whose pattern matches a key below ``prefix`` (its ``{key}`` filled), or ``None``."""
    for pattern, text in marks:
        rx = re.compile(re.escape(prefix) + pattern)
        key = next((k for k in tensors if rx.match(k)), None)
        if key is not None:
            return text.format(key=key)
    return None
