"""Does a Python thread keep running while torch.distributed's rendezvous waits for a late rank?

The runner loads a fresh distributed run's models in a thread while the process group forms
(pipeline/runner.py, _load_models_early): that only pays if init_process_group releases the GIL
while it waits. Two gloo ranks on this machine; rank 0 arrives --late seconds after rank 1. Rank 1
counts a busy thread's loop iterations per second during its wait and alone afterwards.

    python benchmarks/gil_during_rendezvous.py [--late 3] [--out benchmarks/results/gil_during_rendezvous_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

RANK = r"""
import datetime, json, os, sys, threading, time
import torch.distributed as dist
rank, late, port = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2")
if rank == 0:
    time.sleep(late)
count, stop = [0], [False]
def spin():
    while not stop[0]:
        count[0] += 1
def rate(seconds_fn):
    count[0], stop[0] = 0, False
    t = threading.Thread(target=spin); t.start()
    t0 = time.perf_counter(); seconds_fn(); dt = time.perf_counter() - t0
    stop[0] = True; t.join()
    return dt, count[0] / dt
wait_s, during = rate(lambda: dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120)))
_, alone = rate(lambda: time.sleep(1.0))
print(json.dumps({"rank": rank, "init_seconds": wait_s, "spins_per_s_during_init": during, "spins_per_s_alone": alone}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--late", type=float, default=3.0)
    p.add_argument("--port", default="29877")
    p.add_argument("--out")
    args = p.parse_args()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(args.late), args.port], stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in ranks]
    waiting = results[1]
    from provenance import provenance

    result = {"late_seconds": args.late, "ranks": results, **provenance()}
    print(f"rank 1 waited {waiting['init_seconds']:.2f} s in init_process_group; a busy thread ran "
          f"{waiting['spins_per_s_during_init']:.3g} loops/s meanwhile, {waiting['spins_per_s_alone']:.3g} alone")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
