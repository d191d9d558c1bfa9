"""Tables for docs/wa_pycil.md from the logs: accuracy after task 2 (%), AbdomenCT test recall in brackets."""
import re, os, sys
W = "/work/scratch/wa"; P = "/work/scratch/pycil_run"

def dyn(path):
    if not os.path.exists(path): return None
    for line in open(path):
        if line.startswith("TASK 1 "):
            acc = float(line.split()[3]); row0 = re.search(r"confusion rows \[\[(\d+)", line).group(1)
            return acc, int(row0)
def pyc(path):
    if not os.path.exists(path): return None
    for line in open(path):
        if line.startswith("TASK 1 "):
            acc = float(line.split()[3]); rec = float(re.search(r"per-class \[([\d.]+)", line).group(1))
            return acc, rec
def cell(r):
    if r is None: return "not run"
    acc, rec = r
    s = f"{acc:.2f} ({rec:.0f})"
    return f"**{s}**" if rec < 50 else s
def lost(r): return r is not None and r[1] < 50

mode = sys.argv[1]
if mode == "native":
    draws = range(1993, 2010)
    print("| draws | dynammo | PyCIL |\n|---|---|---|")
    nd = npy = 0; cd = cp = 0
    for d in draws:
        a = dyn(f"{W}/probe_1993_draw{d}.log" if d != 1993 else f"{W}/probe_1993.log")
        b = pyc(f"{P}/pycil_1993_draw{d}.log" if d != 1993 else f"{P}/pycil_1993.log")
        if a is None and b is None: continue
        print(f"| {d} | {cell(a)} | {cell(b)} |")
        nd += a is not None; npy += b is not None; cd += lost(a); cp += lost(b)
    print(f"\nlost: dynammo {cd} of {nd}, PyCIL {cp} of {npy}")
elif mode == "swap":
    print("| draws | dynammo on PyCIL's network | PyCIL on dynammo's network |\n|---|---|---|")
    for d in range(1996, 2002):
        print(f"| {d} | {cell(dyn(f'{W}/swap_dyn_from_pycil_{d}.log'))} | {cell(pyc(f'{W}/swap_pycil_from_dyn_{d}.log'))} |")
elif mode == "fixed":
    print("| task-1 network | task-2 seed | dynammo | PyCIL |\n|---|---|---|---|")
    for net in ("dyn_t1_1999", "pycil_t1_2001"):
        for s in (3001, 3002, 3003, 3004):
            print(f"| {net} | {s} | {cell(dyn(f'{W}/fixed_dyn_{net}_{s}.log'))} | {cell(pyc(f'{W}/fixed_pycil_{net}_{s}.log'))} |")
