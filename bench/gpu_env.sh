# Sourced by the bench/gpu_*.sh scripts, from the repository root: installs the wheels in .whl/ (what a lent GPU's
# image lacks: ../shared/device/pack-wheels.sh) into /tmp/site, puts them and the repository on PYTHONPATH, and
# points SID_DATA_ROOT at .gpudata/ unless it is set. PY is the interpreter ($PYTHON, else python3).
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
else
  echo "no .whl/: using the packages $PY already has"
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
export SID_DATA_ROOT=${SID_DATA_ROOT:-$PWD/.gpudata} PYTHONUNBUFFERED=1
