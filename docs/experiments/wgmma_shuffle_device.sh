#!/bin/bash
# The shuffled Q4_K layout on an sm_90 GPU (NOTES.md v33), from the repository root, with the
# gguf wheel in .whl/ (../shared/device/bundle-wheels gguf==0.19.0; carry .whl on each call):
#   STAGE=1 bash docs/experiments/wgmma_shuffle_device.sh   # kernel A/B (~250 s) + ncu of both at M = 512
#   STAGE=2 bash docs/experiments/wgmma_shuffle_device.sh   # 1x512 teacher A/B + the tall tile's CUDA tests
# NCU=0 STAGE=1 runs the A/B without the ncu, STAGE=3 the ncu alone (when device time is short).
# Results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
python3 docs/experiments/wgmma_shuffle_ab.py --check || exit 1
STAGE=${STAGE:-1}
if [ "$STAGE" = 1 ]; then
  TEACHER=0 MS=${MS:-64,256,512,2048} SHAPES=${SHAPES:-18944x3584,3584x18944,152064x3584,3584x3584} timeout ${AB_S:-360} python3 docs/experiments/wgmma_shuffle_ab.py > $OUT/shuffle-ab.txt 2>&1
  echo "ab rc $?"; grep -v "^ \|^{" $OUT/shuffle-ab.txt | tail -30
  [ "${NCU:-1}" = 1 ] && STAGE=3  # NCU=0: the A/B only (when device time is short); STAGE=3: ncu only
fi
if [ "$STAGE" = 3 ]; then
  python3 docs/experiments/wgmma_shuffle_ab.py --emit /tmp/shufk
  NCU_CMD="ncu --clock-control none -k regex:wgmma_gemm --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats"
  timeout 80 $NCU_CMD python3 docs/experiments/wgmma_ncu_target.py 512 > $OUT/ncu-512-tree.txt 2>&1; echo "ncu tree rc $?"
  WG_SHUF=/tmp/shufk timeout 80 $NCU_CMD python3 docs/experiments/wgmma_ncu_target.py 512 > $OUT/ncu-512-shuf.txt 2>&1; echo "ncu shuf rc $?"
  for f in tree shuf; do grep -E "Duration|Compute \(SM\) Throughput|Issued Ipc Active|Warp Cycles Per Issued|Executed Instructions  " $OUT/ncu-512-$f.txt | head -6; done
elif [ "$STAGE" = 2 ]; then
  timeout ${T_S:-400} python3 - > $OUT/shuffle-teacher.txt 2>&1 <<'PY'
import sys; sys.path.insert(0, "docs/experiments")
import wgmma_shuffle_ab as m
from cupy_kernels import launch
import json, os
res = m.time_teacher((launch._HERE / "wgmma.cu").read_text(), (129, 512))
json.dump(res, open(os.environ["OUT"] + "/wgmma-shuffle-teacher.json", "w"), indent=1)
PY
  echo "teacher rc $?"; tail -30 $OUT/shuffle-teacher.txt
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py -k "tall" 2>&1 | tail -6 | tee $OUT/tall-tests.txt
fi
