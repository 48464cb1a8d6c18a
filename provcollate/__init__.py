"""provcollate: keep every example's identity through batching.

Indexed attaches identity, Collator pads and carries it in one fused pass, Recorder puts
outputs back in dataset order; pad / unpad / unpad_scatter_ are the compiled ops underneath.
"""
import json as _json
import os as _os
import warnings as _warnings

import torch as _torch

from . import ops, reference
from .collate import Batch, Collator
from .dataset import Indexed, IndexedIterable, Sample
from .fingerprints import fingerprint
from .ops import HAS_EXTENSION
from .record import Predictions, Recorder, Summary
from .verify import Verification
from .sampler import LengthBucketSampler, lengths_of

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it from here


def _check_build_torch(info_path: str, running: str) -> None:
    """Warn, naming both versions and the fix, when the extension was built against another torch.

    setup.py writes ``_build_info.json`` next to the extension; an extension built against one
    torch fails to load (undefined symbols) under another, most often after a plain
    ``pip install .`` built it against a torch that build isolation downloaded.
    """
    try:
        with open(info_path) as f:
            built = _json.load(f).get("torch")
    except (OSError, ValueError):
        return
    if built and built != running:
        _warnings.warn(
            f"provcollate: the compiled extension was built against torch {built} but torch {running} "
            "is running, so it cannot load. Rebuild it against this torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps provcollate "
            "(from the source tree: pip install --no-build-isolation .)",
            RuntimeWarning,
            stacklevel=2,
        )


if not HAS_EXTENSION:
    _check_build_torch(_os.path.join(_os.path.dirname(__file__), "_build_info.json"), _torch.__version__)

__all__ = ["Indexed", "IndexedIterable", "Sample", "Collator", "Batch", "LengthBucketSampler", "lengths_of", "Recorder", "Predictions", "Summary", "Verification", "fingerprint", "ops", "reference", "HAS_EXTENSION", "__version__"]
