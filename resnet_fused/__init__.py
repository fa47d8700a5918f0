"""resnet-fused: a drop-in fused ResNet for inference.

    import resnet_fused
    fast = resnet_fused.fuse(model.eval())          # same logits, fused kernels
    with torch.inference_mode():
        logits = fast(images)
"""

from .convert import fuse
from .folding import fold_bn
from .ops import BackendFallbackWarning, BackendUnavailableError, available_backends

__version__ = "0.1.0"

__all__ = [
    "fuse",
    "fold_bn",
    "available_backends",
    "BackendUnavailableError",
    "BackendFallbackWarning",
    "__version__",
]
