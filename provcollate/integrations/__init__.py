"""Adapters for the libraries people already run inference with.

Each submodule imports its library when it is imported itself, so ``import provcollate`` never
needs them: ``provcollate.integrations.lightning`` (PyTorch Lightning). They use provcollate's
public API only.
"""
