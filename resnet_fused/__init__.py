"""resnet-fused: a drop-in fused ResNet for inference.

    import resnet_fused
    fast = resnet_fused.fuse(model.eval())          # same logits, fused kernels
    with torch.inference_mode():
        logits = fast(images)
"""

import importlib

__version__ = "0.1.0"

# Public name -> the submodule that defines it. Resolved on first use (PEP 562): importing the
# package, its version or its command line (``resnet_fused.cli``) must not import torch, which
# alone takes seconds; ``resnet-fused --help`` answers before any of it is loaded.
_LAZY = {
    "fuse": "convert",
    "fold_bn": "folding",
    "available_backends": "ops",
    "BackendUnavailableError": "ops",
    "BackendFallbackWarning": "ops",
    "save_tuning": "tuning",
    "load_tuning": "tuning",
    "clear_tuning": "tuning",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name.startswith("__"):  # never import __main__ (it runs the command line) on a probe
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:  # a submodule: resnet_fused.ops, resnet_fused.export, ...
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule exists but needs something missing: say what
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    import pkgutil

    return sorted(set(globals()) | set(_LAZY) | {m.name for m in pkgutil.iter_modules(__path__) if m.name != "__main__"})


__all__ = [
    "fuse",
    "fold_bn",
    "available_backends",
    "BackendUnavailableError",
    "BackendFallbackWarning",
    "save_tuning",
    "load_tuning",
    "clear_tuning",
    "__version__",
]
