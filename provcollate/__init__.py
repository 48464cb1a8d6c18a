"""provcollate: keep every example's identity through batching.

Indexed attaches identity, Collator pads and carries it in one fused pass, Recorder puts
outputs back in dataset order; pad / unpad / unpad_scatter_ are the compiled ops underneath.
"""
from . import ops, reference
from .dataset import Indexed, Sample
from .ops import HAS_EXTENSION

__version__ = "0.1.0"

__all__ = ["Indexed", "Sample", "ops", "reference", "HAS_EXTENSION", "__version__"]
