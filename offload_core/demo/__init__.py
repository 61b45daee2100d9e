"""Bundled demo model for moeshard: a tiny Mixtral MoE trained on CPython's stdlib.

Tests and examples load it from :func:`demo_model_path`; ``train.py`` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path


def demo_model_path() -> Path:
    """Folder holding the bundled demo model, tokenizer and training report."""
    return Path(__file__).parent / "model"
