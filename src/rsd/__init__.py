"""rsd: residual speculative decoding for vision-language-action robot policies."""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root (``conf/``, ``data/``, ``logs/`` live here); the package is installed editable.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
