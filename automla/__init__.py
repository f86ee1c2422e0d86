"""AutoMLA: architecture search for Multi-Level Attention language models."""

import os as _os

__version__ = "0.1.0"

# Installed, `automla.kernels` and `automla.trainers` map to kernels/ and trainers/ (see
# pyproject.toml). Run from a source checkout without an install (as on a GPU machine that
# only receives the tree), find them beside this folder instead.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "naive.py")
):
    __path__.append(_root)  # noqa: F821
