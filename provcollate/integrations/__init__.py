"""Adapters for the libraries people already run inference with.

Each submodule imports its library when it is imported itself, so ``import provcollate`` never
needs them: ``provcollate.integrations.lightning`` (PyTorch Lightning's ``PredictionWriter``) and
``provcollate.integrations.transformers`` (``predict`` for a transformers ``Trainer``) and
``provcollate.integrations.ray`` (``Predict`` for Ray Data's ``map_batches``, ``read`` of what
``write_parquet`` left, resume by id); the accelerate recipe is in the README and
examples/accelerate_predict.py. They use provcollate's public API only.
"""
