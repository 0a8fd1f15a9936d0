#!/bin/bash
# The SS variant of the Q4_K wgmma GEMM (wgmma_ss.cu, NOTES.md v36) on an sm_90 GPU, from the
# repository root, with the gguf wheel in .whl/ (../shared/device/bundle-wheels gguf==0.19.0;
# carry .whl on each call). One call (~5 min): the CPU checks, the kernel A/B (tree, ss, bare;
# torch bf16 and decode + cuBLAS beside them) on the three large 7B shapes and 3584x3584 at
# M = 256..2048, the teacher A/B (1x512: tree, ss, ss_attn; 4x512: tree, ss_wide), then ncu at
# M = 512 on 18944x3584 of ss, the tree and cuBLAS (NCU=0 skips it). Results under $OUT.
#   TEACHER=0 / TEACHER_4X512=0 skip the teacher parts; MS, SHAPES as wgmma_ab.cases.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
python3 docs/experiments/wgmma_ss_ab.py --check > $OUT/ss-check.txt 2>&1 || { cat $OUT/ss-check.txt; exit 1; }
timeout ${AB_S:-420} python3 docs/experiments/wgmma_ss_ab.py > $OUT/ss-ab.txt 2>&1
echo "ab rc $?"; grep -v "^ \|^{" $OUT/ss-ab.txt | grep -v "^round\|^teacher" | tail -24; grep "over_tree" $OUT/ss-ab.txt
if [ "${NCU:-1}" = 1 ]; then
  SECTIONS="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --metrics lts__t_bytes.sum,l1tex__m_xbar2l1tex_read_bytes.sum,sm__cycles_active.avg"
  NCU_CMD="ncu --clock-control none --launch-skip 3 --launch-count 1 $SECTIONS"
  WG_SS=1 timeout 90 $NCU_CMD -k regex:wgmma_ss_gemm python3 docs/experiments/wgmma_ncu_target.py 512 > $OUT/ncu-512-ss.txt 2>&1; echo "ncu ss rc $?"
  timeout 90 $NCU_CMD -k regex:wgmma_gemm python3 docs/experiments/wgmma_ncu_target.py 512 > $OUT/ncu-512-tree.txt 2>&1; echo "ncu tree rc $?"
  WG_TORCH=1 timeout 90 $NCU_CMD -k regex:"nvjet|gemm|xmma|cutlass" python3 docs/experiments/wgmma_ncu_target.py 512 > $OUT/ncu-512-torch.txt 2>&1; echo "ncu torch rc $?"
  for f in ss tree torch; do echo "== $f"; grep -E "Duration|Compute \(SM\) Throughput|Issued Ipc Active|Warp Cycles Per Issued|lts__t_bytes|xbar2l1tex" $OUT/ncu-512-$f.txt | head -7; done
fi
