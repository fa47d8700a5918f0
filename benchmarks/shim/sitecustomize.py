"""Makes ``resnet_fused.kernels`` importable from a source tree that was never installed.

setup.py ships the top-level ``kernels/`` directory as ``resnet_fused.kernels``; only an install
sets up that mapping. gpu_check.sh puts this directory and the repository root on PYTHONPATH, so
every Python process it starts (pytest, the CLI) finds the package without pip.
"""

import importlib.abc
import importlib.util
import os
import sys

_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "resnet_fused.kernels":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(_KERNELS, "__init__.py"),
                                                      submodule_search_locations=[_KERNELS])


sys.meta_path.insert(0, _KernelsFinder())
