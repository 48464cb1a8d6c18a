"""provcollate: keep every example's identity through batching.

Indexed attaches identity, Collator pads and carries it in one fused pass, Recorder puts
outputs back in dataset order; pad / unpad / unpad_scatter_ are the compiled ops underneath.
"""
from . import ops, reference
from .collate import Batch, Collator
from .dataset import Indexed, IndexedIterable, Sample
from .ops import HAS_EXTENSION
from .record import Predictions, Recorder
from .sampler import LengthBucketSampler, lengths_of

__version__ = "0.1.0"

__all__ = ["Indexed", "IndexedIterable", "Sample", "Collator", "Batch", "LengthBucketSampler", "lengths_of", "Recorder", "Predictions", "ops", "reference", "HAS_EXTENSION", "__version__"]
