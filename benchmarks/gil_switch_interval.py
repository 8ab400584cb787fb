"""Why the model load shortens the GIL switch interval: a CPU check of the mechanism.

The ranks copy ~500 ESM-2 weight tensors onto the GPU while loader threads do CPU-bound Python
(DNABERT-S's build, optionally DeepSpeed's import). Each copy releases the GIL; getting it back
waits until the busy thread's switch interval runs out. This script times 500 tensor copies (2 MB
each, GIL released inside as a host-to-device copy would) alone and beside a thread that runs
Python for 2 s, at the default 5 ms interval and at the 0.5 ms the loader uses
(virnuc_ds/pipeline/embed_part.py, LOAD_SWITCH_INTERVAL_S). Each setting runs in a fresh process,
the settings interleaved, REPEATS times.

    python benchmarks/gil_switch_interval.py [--repeats 3] [--out benchmarks/results/gil_switch_interval.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, threading, time, torch
interval, busy = float(sys.argv[1]), sys.argv[2] == "1"
torch.set_num_threads(1)
src = [torch.randn(500_000) for _ in range(500)]  # 500 x 2 MB
dst = [torch.empty_like(s) for s in src]
sys.setswitchinterval(interval)

def python_work():  # CPU-bound Python, as an import or a model build is
    t, x = time.time(), 0
    while time.time() - t < 2.0:
        for i in range(1000):
            x += i * i

if busy:
    thread = threading.Thread(target=python_work)
    thread.start()
t0 = time.time()
for s, d in zip(src, dst):
    d.copy_(s)
print(time.time() - t0)
if busy:
    thread.join()
"""

SETTINGS = [(0.005, False), (0.0005, False), (0.005, True), (0.0005, True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for interval, busy in SETTINGS:
            out = subprocess.run([sys.executable, "-c", CHILD, str(interval), "1" if busy else "0"],
                                 capture_output=True, text=True, check=True).stdout
            times.setdefault(f"{interval * 1000:g} ms, {'beside a busy thread' if busy else 'alone'}", []).append(float(out))
    from provenance import print_medians, provenance

    result = {"copies_seconds": times, **provenance()}
    print_medians("setting", times)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
