#!/bin/bash
# The SS variant of the Q4_K / Q6_K wgmma GEMM (wgmma_ss.cu, NOTES.md v36) on an sm_90 GPU, from
# the repository root, with the gguf wheel in .whl/ (../shared/device/bundle-wheels
# gguf==0.19.0; carry .whl on each call). Two calls, back to back on a warm machine:
#   STAGE=1 bash docs/experiments/wgmma_ss_device.sh   # CPU checks + kernel A/B (~5 min)
#   STAGE=2 bash docs/experiments/wgmma_ss_device.sh   # teacher A/B (1x512, 4x512) + ncu at M = 512
# Stage 1: the CPU checks; the smoke run (wgmma_ss_ab.py --smoke: each SS case once on the watchdog build); then tree, ss (two decoded stages), ss3 (three) and bare, torch bf16 and decode + cuBLAS beside them, Q4_K and Q6_K on the
# three large 7B shapes and 3584x3584 at M = 256, 512 and 2048 (MS, SHAPES, TYPES as wgmma_ab.cases).
# Stage 2: the teacher on the faster of ss and ss3 (TEACHER_4X512=0 skips 4x512), then ncu of ss, the tree and cuBLAS on
# 18944x3584 at M = 512 (NCU=0 skips it; STAGE=3 runs the ncu alone). Results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
STAGE=${STAGE:-1}
# the smoke run: every SS case once on the watchdog build (a hang ends in a report, not a stuck
# GPU); after a crash it resumes past the case that crashed. The timed runs keep what hung or
# crashed on the tree's kernel (the log, /tmp/wgmma-ss-smoke.jsonl, says which).
smoke() {
  for try in 1 2 3 4 5; do
    timeout ${SMOKE_S:-150} python3 docs/experiments/wgmma_ss_ab.py --smoke >> $OUT/ss-smoke.txt 2>&1 && break
    echo "smoke try $try ended with rc $?"
  done
  cp /tmp/wgmma-ss-smoke.jsonl $OUT/ 2>/dev/null; tail -4 $OUT/ss-smoke.txt
}
if [ "$STAGE" = 1 ]; then
  python3 docs/experiments/wgmma_ss_ab.py --check > $OUT/ss-check.txt 2>&1 || { cat $OUT/ss-check.txt; exit 1; }
  rm -f /tmp/wgmma-ss-smoke.jsonl
  smoke
  # what is left of the call's 600 s, less a margin for the copies back
  TEACHER=0 timeout ${AB_S:-$((570 - SECONDS))} python3 docs/experiments/wgmma_ss_ab.py > $OUT/ss-ab.txt 2>&1
  echo "ab rc $?"; grep "^M=" $OUT/ss-ab.txt | tail -40
fi
if [ "$STAGE" = 2 ]; then
  [ -f /tmp/wgmma-ss-smoke.jsonl ] || smoke  # a fresh machine: the smoke run first
  timeout ${T_S:-$((335 - SECONDS))} python3 - > $OUT/ss-teacher.txt 2>&1 <<'PY'
import sys; sys.path.insert(0, "docs/experiments")
import os
os.environ["AB_TEACHER_ONLY"] = "1"
import wgmma_ss_ab as m
m.main()
PY
  echo "teacher rc $?"; grep -E "over_tree|launches|Error|error" $OUT/ss-teacher.txt | tail -8
  [ "${NCU:-1}" = 1 ] && STAGE=3
fi
if [ "$STAGE" = 3 ]; then
  SECTIONS="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --metrics lts__t_bytes.sum,l1tex__m_xbar2l1tex_read_bytes.sum,sm__cycles_active.avg"
  NCU_CMD="ncu --clock-control none --launch-skip 3 --launch-count 1 $SECTIONS"
  WG_SS=1 timeout 80 $NCU_CMD -k regex:wgmma_ss_gemm python3 docs/experiments/wgmma_ncu_target.py 512 > $OUT/ncu-512-ss.txt 2>&1; echo "ncu ss rc $?"
  timeout 80 $NCU_CMD -k regex:wgmma_gemm python3 docs/experiments/wgmma_ncu_target.py 512 > $OUT/ncu-512-tree.txt 2>&1; echo "ncu tree rc $?"
  WG_TORCH=1 timeout 80 $NCU_CMD -k regex:"nvjet|gemm|xmma|cutlass" python3 docs/experiments/wgmma_ncu_target.py 512 > $OUT/ncu-512-torch.txt 2>&1; echo "ncu torch rc $?"
  for f in ss tree torch; do echo "== $f"; grep -E "Duration|Compute \(SM\) Throughput|Issued Ipc Active|Warp Cycles Per Issued|lts__t_bytes|xbar2l1tex" $OUT/ncu-512-$f.txt | head -7; done
fi
