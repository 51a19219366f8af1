"""vitresize: move a pretrained Vision Transformer checkpoint to a new input resolution or patch size.

>>> import vitresize
>>> report = vitresize.convert("vit.pth", "vit_384.safetensors", img_size=384)  # doctest: +SKIP
>>> target = vitresize.Target(img_size=384, patch=16)
>>> with vitresize.plan("vit.pth", target, vitresize.Options(method="timm")) as p:  # doctest: +SKIP
...     report = p.execute("vit_384.safetensors")
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__
from .api import convert as convert
from .api import inspect as inspect
from .api import plan as plan
from .errors import CheckpointFormatError as CheckpointFormatError
from .errors import DeviceError as DeviceError
from .errors import GeometryError as GeometryError
from .errors import InternalError as InternalError
from .errors import MissingDependencyError as MissingDependencyError
from .errors import NoViTFoundError as NoViTFoundError
from .errors import OutputExistsError as OutputExistsError
from .errors import UnsafeCheckpointError as UnsafeCheckpointError
from .errors import UsageError as UsageError
from .errors import VitresizeError as VitresizeError
from .options import Options as Options
from .options import Target as Target
from .plans import Plan as Plan
from .report import Inspection as Inspection
from .report import Report as Report

if TYPE_CHECKING:
    from .fidelity.check import check as check
    from .fidelity.results import CheckReport as CheckReport


def __getattr__(name: str) -> Any:
    """``check`` and ``CheckReport``, imported when first used: a conversion does not pay for them."""
    if name == "check":
        from .fidelity.check import check

        return check
    if name == "CheckReport":
        from .fidelity.results import CheckReport

        return CheckReport
    raise AttributeError(f"module 'vitresize' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "CheckReport",
    "CheckpointFormatError",
    "DeviceError",
    "GeometryError",
    "Inspection",
    "InternalError",
    "MissingDependencyError",
    "NoViTFoundError",
    "Options",
    "OutputExistsError",
    "Plan",
    "Report",
    "Target",
    "UnsafeCheckpointError",
    "UsageError",
    "VitresizeError",
    "__version__",
    "check",
    "convert",
    "inspect",
    "plan",
]
