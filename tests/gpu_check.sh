#!/usr/bin/env bash
# The checks only a CUDA machine can run, in one go: bash tests/gpu_check.sh OUT_DIR [PART ...]
# (PART: pytest, routes, tiny, speed; all four when none is named)
# (the CPU suite skips tests/test_cuda.py; this runs it, then the speed benches on the GPU).
# Each part has its own time limit, so that one slow part cannot take the others' results with it;
# every part writes its own file in OUT_DIR.
set -uo pipefail
out=${1:?usage: bash tests/gpu_check.sh OUT_DIR [PART ...]}
shift
parts=" ${*:-pytest routes tiny speed} "
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'torchjd', __import__('importlib.metadata').metadata.version('torchjd'))"
} > "$out/gpu.txt" 2>&1
part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output in OUT_DIR/NAME.txt
  local name=$1 limit=$2; shift 2
  [[ $parts == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/gpu.txt"
}
part pytest 210 "$py" -m pytest -q -p no:cacheprovider -rfE tests/test_cuda.py
part routes 70 "$py" -m polytask bench small --routes --device cuda --rounds 5 --block 10
part tiny 45 "$py" -m polytask bench small --device cuda --repeats 0 --rounds 9 --block 20
part speed 170 "$py" -m polytask bench speed --device cuda --encoders mlp,cnn --tasks 10,40 \
  --methods upgrad,mgda,pcgrad,moco,graddrop --peers --no-small --steps 5 --csv "$out/speed.csv"
