#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh installs on the GPU machine, whose image has torch, numpy,
# pandas, pyarrow, matplotlib, tqdm, pytest and hypothesis (Python 3.12) but not the MuJoCo
# stack. Run here (the package registry is reachable from this machine, not from that one); it
# writes .whl/ (git-ignored through .git/info/exclude), ~14 MB, the versions of this venv.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
py=.venv/bin/python
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
rm -rf .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    "gymnasium==$(version gymnasium)" "mujoco==$(version mujoco)" \
    "mujoco-core==$(version mujoco)" farama-notifications glfw pyopengl
ls .whl
