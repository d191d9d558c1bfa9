#!/bin/bash
# issue 22 WA: more draws on split 1993, two tasks each; dynammo (b3aa918) and PyCIL in two single-thread streams
while [ ! -f /work/rr22/ALLDONE22 ]; do sleep 15; done
cd /work/scratch/wa
(for d in 1996 1997 1998 1999 2000 2001; do
  [ -f probe_1993_draw$d.log ] && grep -q "^TASK 1" probe_1993_draw$d.log && continue
  SAVE_T1=/work/scratch/swap/dyn_t1_$d.pt DRAW_SEED=$d PYTHONPATH=/work/scratch/dyn_b3/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout 1200 python probe_dyn.py 1993 > probe_1993_draw$d.log 2>&1
done; touch /work/scratch/wa/DYN_DONE) &
(cd /work/scratch/pycil_run && for d in 1996 1997 1998 1999 2000 2001; do
  [ -f pycil_1993_draw$d.log ] && grep -q "^RESULT" pycil_1993_draw$d.log && continue
  SAVE_T1=/work/scratch/swap/pycil_t1_$d.pt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout 1500 python run_pycil_wa.py /work/scratch/wa/split_1993.npz $d align 2 > pycil_1993_draw$d.log 2>&1
done; touch /work/scratch/wa/PYCIL_DONE) &
wait
# the swap: each framework trains task 2 from the other's task-1 network (same draw seed)
(for d in 1996 1997 1998 1999 2000 2001; do
  [ -f swap_dyn_from_pycil_$d.log ] && grep -q "^TASK 1" swap_dyn_from_pycil_$d.log && continue
  LOAD_T1=/work/scratch/swap/pycil_t1_$d.pt DRAW_SEED=$d PYTHONPATH=/work/scratch/dyn_b3/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout 1200 python probe_dyn.py 1993 > swap_dyn_from_pycil_$d.log 2>&1
done) &
(cd /work/scratch/pycil_run && for d in 1996 1997 1998 1999 2000 2001; do
  [ -f /work/scratch/wa/swap_pycil_from_dyn_$d.log ] && grep -q "^RESULT" /work/scratch/wa/swap_pycil_from_dyn_$d.log && continue
  LOAD_T1=/work/scratch/swap/dyn_t1_$d.pt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout 1500 python run_pycil_wa.py /work/scratch/wa/split_1993.npz $d align 2 > /work/scratch/wa/swap_pycil_from_dyn_$d.log 2>&1
done) &
wait
touch /work/scratch/wa/SWAP_DONE
#!/bin/bash
# issue 22 WA: the same task-1 network (and so the same herded memory) trained on task 2 by both frameworks, 4 task-2 seeds each
while [ ! -f /work/scratch/wa/SWAP_DONE ]; do sleep 10; done
cd /work/scratch/wa
run_dyn() { LOAD_T1=/work/scratch/swap/$1.pt DRAW_SEED=$2 PYTHONPATH=/work/scratch/dyn_b3/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout 1200 python probe_dyn.py 1993 > fixed_dyn_$1_$2.log 2>&1; }
run_pycil() { (cd /work/scratch/pycil_run && LOAD_T1=/work/scratch/swap/$1.pt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout 1500 python run_pycil_wa.py /work/scratch/wa/split_1993.npz $2 align 2 > /work/scratch/wa/fixed_pycil_$1_$2.log 2>&1); }
(for net in dyn_t1_1999 pycil_t1_2001; do for s in 3001 3002 3003 3004; do grep -q "^TASK 1" fixed_dyn_${net}_$s.log 2>/dev/null || run_dyn $net $s; done; done) &
(for net in dyn_t1_1999 pycil_t1_2001; do for s in 3001 3002 3003 3004; do grep -q "^RESULT" fixed_pycil_${net}_$s.log 2>/dev/null || run_pycil $net $s; done; done) &
wait; touch /work/scratch/wa/FIXED_DONE
#!/bin/bash
# issue 22 WA: more draws on split 1993, two tasks each; dynammo (b3aa918) and PyCIL in two single-thread streams
while [ ! -f /work/scratch/wa/FIXED_DONE ]; do sleep 15; done
cd /work/scratch/wa
(for d in 2002 2003 2004 2005 2006 2007 2008 2009; do
  [ -f probe_1993_draw$d.log ] && grep -q "^TASK 1" probe_1993_draw$d.log && continue
  SAVE_T1=/work/scratch/swap/dyn_t1_$d.pt DRAW_SEED=$d PYTHONPATH=/work/scratch/dyn_b3/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout 1200 python probe_dyn.py 1993 > probe_1993_draw$d.log 2>&1
done; touch /work/scratch/wa/DYN_DONE) &
(cd /work/scratch/pycil_run && for d in 2002 2003 2004 2005 2006 2007 2008 2009; do
  [ -f pycil_1993_draw$d.log ] && grep -q "^RESULT" pycil_1993_draw$d.log && continue
  SAVE_T1=/work/scratch/swap/pycil_t1_$d.pt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout 1500 python run_pycil_wa.py /work/scratch/wa/split_1993.npz $d align 2 > pycil_1993_draw$d.log 2>&1
done; touch /work/scratch/wa/PYCIL_DONE) &
wait
touch /work/scratch/wa/DRAWS5_DONE
#!/bin/bash
# the runs that lost AbdomenCT with gamma > 1: test recall before and after the alignment
while [ ! -f /work/scratch/wa/DRAWS5_DONE ]; do sleep 10; done
cd /work/scratch/wa
(PRE_ALIGN_EVAL=1 LOAD_T1=/work/scratch/swap/pycil_t1_2001.pt DRAW_SEED=3001 PYTHONPATH=/work/scratch/dyn_b3/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python probe_dyn.py 1993 > prealign_dyn_pycil_t1_2001_3001.log 2>&1) &
(cd /work/scratch/pycil_run && PRE_ALIGN_EVAL=1 LOAD_T1=/work/scratch/swap/pycil_t1_2001.pt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python run_pycil_wa.py /work/scratch/wa/split_1993.npz 3002 align 2 > /work/scratch/wa/prealign_pycil_pycil_t1_2001_3002.log 2>&1) &
wait; touch /work/scratch/wa/PREALIGN_DONE
