"""dtype names: safetensors codes <-> torch's names (``"float32"``), item sizes, NaN/Inf counting (numpy, no torch)."""

from __future__ import annotations

import math

# safetensors code -> (torch dtype name, bytes per element)
ST_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),  # torch >= 2.7
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "C64": ("complex64", 8),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
}
TORCH_TO_ST: dict[str, str] = {name: code for code, (name, _) in ST_DTYPES.items()}
# Every code safetensors (0.8) reads, with its bits per element: the floats packed below a byte (F4 two to a byte,
# F6 four to three bytes) are valid in a file but not read by vitresize.
ST_BITS: dict[str, int] = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6} | {code: 8 * n for code, (_, n) in ST_DTYPES.items()}


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a tensor of a torch dtype name; 0 for dtypes safetensors cannot store (its writer refuses them)."""
    code = TORCH_TO_ST.get(dtype)
    return math.prod(shape) * ST_DTYPES[code][1] if code else 0


# Floating dtypes: (numpy dtype of an element's bits, little-endian as safetensors and torch store them; mask; value).
# An element is NaN or Inf exactly when its bits under the mask equal the value, so they can be counted from raw bytes
# without torch. For F16, BF16, F32 and F64 that is all the exponent bits set. The float8 codes, as torch reads them:
# F8_E4M3 (float8_e4m3fn: no Inf, NaN is S.1111.111), F8_E5M2 (IEEE-like: exponent all ones is Inf or NaN),
# F8_E4M3FNUZ and F8_E5M2FNUZ (no Inf, no -0: the one NaN is 0x80) and F8_E8M0 (float8_e8m0fnu: exponent only, NaN is
# 0xFF). Complex codes are not listed: they count 0, as do integer and bool ones (as :func:`.base.nonfinite` does).
_NONFINITE: dict[str, tuple[str, int, int]] = {
    "F16": ("<u2", 0x7C00, 0x7C00),
    "BF16": ("<u2", 0x7F80, 0x7F80),
    "F32": ("<u4", 0x7F800000, 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000, 0x7FF0000000000000),
    "F8_E4M3": ("u1", 0x7F, 0x7F),
    "F8_E5M2": ("u1", 0x7C, 0x7C),
    "F8_E4M3FNUZ": ("u1", 0xFF, 0x80),
    "F8_E5M2FNUZ": ("u1", 0xFF, 0x80),
    "F8_E8M0": ("u1", 0xFF, 0xFF),
}
_CHUNK_BYTES = 1 << 22
"""Bytes of a tensor counted per step: the temporaries stay a few MiB however big the tensor."""


def count_nonfinite(raw: bytes | bytearray, dtype: str) -> int:
    """NaN and Inf elements in the little-endian bytes of a safetensors ``dtype`` (0 for other than the float codes
    F16, BF16, F32, F64 and the float8 ones). Vectorised with numpy, in steps of :data:`_CHUNK_BYTES`; never imports
    torch."""
    if dtype not in _NONFINITE or not raw:
        return 0
    import numpy as np

    code, mask, value = _NONFINITE[dtype]
    bits = np.frombuffer(raw, dtype=code)  # a view: no copy of the tensor
    mask_bits, value_bits = bits.dtype.type(mask), bits.dtype.type(value)
    step = _CHUNK_BYTES // bits.itemsize
    masked = np.empty(min(step, bits.size), dtype=bits.dtype)
    count = 0
    for start in range(0, bits.size, step):
        part = bits[start : start + step]
        out = masked[: part.size]
        np.bitwise_and(part, mask_bits, out=out)
        count += int(np.count_nonzero(out == value_bits))
    return count
