"""Rank context: who am I, which device, and barriers that time out instead of hanging.

Under the `deepspeed` launcher (or torchrun, or SLURM through them) RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT are set; without them the run is a single rank. The process group is
torch.distributed's (gloo within one node and on CPUs, NCCL across GPU nodes; run.process_group):
the runner only needs barriers and small messages, and this avoids DeepSpeed's CPU shared-memory
comm op, a JIT build the ranks do not need.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import EXIT_FAILURE, VirnucError


@dataclass
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    distributed: bool
    timeout: datetime.timedelta = datetime.timedelta(minutes=60)  # run.collective_timeout_minutes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self, what: str = "") -> None:
        if not self.distributed:
            return
        if dist.get_backend() == "gloo":
            # names the ranks that did not arrive when it times out (given explicitly: its own default
            # is not the process group's timeout on every torch version)
            dist.monitored_barrier(timeout=self.timeout, wait_all_ranks=True)
        else:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def on_main(self, fn, *args, **kwargs):
        """Run fn on rank 0 and hand its result (or its error) to every rank, so no rank waits forever."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised on rank 0
                error = exc
        if self.distributed:
            failure = None if error is None else (str(error), getattr(error, "exit_code", EXIT_FAILURE))
            box = [(result, failure)]
            dist.broadcast_object_list(box, src=0)
            result, failure = box[0]
            if failure is not None and not self.is_main:
                exc = VirnucError(f"rank 0 failed: {failure[0]}")
                exc.exit_code = failure[1]
                exc.all_ranks = True
                raise exc
        if error is not None:
            error.all_ranks = True  # every rank raises it at the same point: they can still leave together
            raise error
        return result

    def gather(self, obj) -> list:
        """Every rank's obj, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        box = [None] * self.world_size
        dist.all_gather_object(box, obj)
        return box

    def close(self, drain: bool = False) -> None:
        """Tear down the process group (idempotent). drain=True, on a normal end only: a final
        barrier first, so no rank tears down gloo while a peer still finishes a broadcast (that
        can abort the process at exit). On an error path peers may be in another collective."""
        if self.distributed and dist.is_initialized():
            if drain:
                dist.barrier()
            dist.destroy_process_group()


def share_cores(ranks_on_node: int) -> int:
    """Give this rank its share of the node's cores (those this process may run on): torch's
    intra-op threads and, unless the user set it, the Rust thread pool of the DNABERT-S tokenizer
    (RAYON_NUM_THREADS, read when the tokenizer first runs in parallel). Without this every rank
    of a node starts one thread per core for both, and the ranks contend for the CPU between GPU
    batches. Returns the share."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, ranks_on_node))
    torch.set_num_threads(share)
    os.environ.setdefault("RAYON_NUM_THREADS", str(share))
    return share


def process_group_backend(setting: str, use_cuda: bool, world: int, local_world_named: int | None) -> str:
    """The torch.distributed backend for the run's barriers and small messages (run.process_group).
    auto: gloo when every rank is on this node (the launcher says how many ranks the node has and
    that is all of them): a TCP rendezvous on the loopback that takes no GPU memory, and whose
    barrier names the ranks that did not arrive; NCCL would build GPU communicators to carry only
    barriers. (Start-up time is the same either way: the rendezvous waits for the slowest rank's
    imports.) nccl otherwise: across nodes NCCL finds a usable network interface itself. CPU ranks:
    gloo."""
    if not use_cuda:
        return "gloo"
    if setting == "auto":
        return "gloo" if local_world_named == world else "nccl"
    return setting


@dataclass(frozen=True)
class RankPlacement:
    """Where this rank runs, known from the launcher's environment before any rank talks to another."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    local_world_named: int | None  # the launcher's count of this node's ranks, if it gave one
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def place_rank(force_cpu: bool = False) -> RankPlacement:
    """This rank's GPU (LOCAL_RANK's, made current) or the CPU, and its share of the node's cores."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    named = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE"))  # torchrun / the deepspeed launcher
    local_world = int(named) if named else world
    use_cuda = torch.cuda.is_available() and not force_cpu
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if local_world > 1 or not use_cuda:
        share_cores(local_world)
    return RankPlacement(rank, world, local_rank, local_world, int(named) if named else None, device)


def join_ranks(placement: RankPlacement, timeout_minutes: int = 60, backend_setting: str = "auto") -> RankContext:
    """The process group of a distributed run (waits for every rank to arrive; the GIL is free
    meanwhile, so a thread can load models); the rank context either way."""
    if placement.distributed and not dist.is_initialized():
        use_cuda = placement.device.type == "cuda"
        backend = process_group_backend(backend_setting, use_cuda, placement.world_size, placement.local_world_named)
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": placement.device} if backend == "nccl" else {}),
        )
    return RankContext(placement.rank, placement.world_size, placement.local_rank, placement.local_world_size,
                       placement.device, placement.distributed, datetime.timedelta(minutes=timeout_minutes))
