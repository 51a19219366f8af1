"""dtype names: safetensors codes <-> torch's names (``"float32"``), item sizes, NaN/Inf counting. Pure Python."""

from __future__ import annotations

import math
import sys

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


# Floating dtypes: (memoryview format of an element, mask of the exponent bits). An element is NaN or
# Inf exactly when all its exponent bits are set, so they can be counted from raw bytes without torch.
_EXPONENT: dict[str, tuple[str, int]] = {
    "F16": ("H", 0x7C00),
    "BF16": ("H", 0x7F80),
    "F32": ("I", 0x7F800000),
    "F64": ("Q", 0x7FF0000000000000),
}


def count_nonfinite(raw: bytes | bytearray, dtype: str) -> int:
    """NaN and Inf elements in the little-endian bytes of a safetensors ``dtype`` (0 for non-float types)."""
    if dtype not in _EXPONENT or not raw:
        return 0
    fmt, mask = _EXPONENT[dtype]
    if sys.byteorder != "little":  # pragma: no cover - reversing all bytes reverses each element's
        raw = bytes(reversed(raw))
    view: memoryview[int] = memoryview(raw).cast(fmt)  # type: ignore[call-overload]
    return sum(1 for x in view if x & mask == mask)
