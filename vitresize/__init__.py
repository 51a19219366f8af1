"""vitresize: move a pretrained Vision Transformer checkpoint to a new input resolution or patch size.

>>> import vitresize
>>> report = vitresize.convert("vit.pth", "vit_384.safetensors", img_size=384)  # doctest: +SKIP
"""

from ._version import __version__ as __version__
from .api import convert as convert
from .api import inspect as inspect
from .api import plan as plan
from .errors import VitresizeError as VitresizeError
from .plan import Inspection as Inspection
from .plan import Plan as Plan
from .plan import Report as Report

__all__ = ["Inspection", "Plan", "Report", "VitresizeError", "__version__", "convert", "inspect", "plan"]
