"""pixelwise: image segmentation with PyTorch and torchvision.

The public API is imported lazily so that `import pixelwise` (and `pixelwise --help`) stays fast:
torch is loaded only when a name that needs it is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "UserError": "pixelwise.errors",
    "UPSAMPLERS": "pixelwise.upsample",
    "make_upsampler": "pixelwise.upsample",
    "MaxPoolWithIndices": "pixelwise.upsample",
    "conv_matrix": "pixelwise.matrix",
    "conv_matrix_2d": "pixelwise.matrix",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pixelwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
