"""Rank context helpers that need no second process."""

import os

import torch

from virnuc_ds.pipeline.distributed import share_cores


def test_ranks_of_a_node_share_its_cores(monkeypatch):
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    before = torch.get_num_threads()
    try:
        assert share_cores(4) == 16
        assert torch.get_num_threads() == 16
        assert os.environ["RAYON_NUM_THREADS"] == "16"  # the DNABERT-S tokenizer's pool
        assert share_cores(128) == 1  # more ranks than cores: one thread each, never zero
    finally:
        torch.set_num_threads(before)


def test_a_users_tokenizer_thread_setting_is_kept(monkeypatch):
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    before = torch.get_num_threads()
    try:
        share_cores(2)
        assert os.environ["RAYON_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(before)


def test_process_group_backend():
    from virnuc_ds.pipeline.distributed import process_group_backend

    assert process_group_backend("auto", True, 4, 4) == "gloo"  # one node: every rank here
    assert process_group_backend("auto", True, 8, 4) == "nccl"  # two nodes
    assert process_group_backend("auto", True, 8, None) == "nccl"  # the launcher did not say: assume several nodes
    assert process_group_backend("nccl", True, 4, 4) == "nccl"
    assert process_group_backend("gloo", True, 8, 4) == "gloo"
    assert process_group_backend("nccl", False, 4, 4) == "gloo"  # CPU ranks


def test_the_end_barrier_times_out_after_run_collective_timeout_minutes(monkeypatch):
    """gloo's monitored barrier is given the configured timeout: its own default (30 min) is not the
    process group's on every torch version."""
    import datetime

    from virnuc_ds.pipeline import distributed

    seen = {}
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(distributed.dist, "monitored_barrier", lambda **kwargs: seen.update(kwargs))
    one = distributed.RankPlacement(0, 1, 0, 1, None, torch.device("cpu"))
    ctx = distributed.join_ranks(one, timeout_minutes=7)
    ctx.distributed = True  # as in a run of several ranks (no process group is needed to see the call)
    ctx.barrier("embeddings done")
    assert seen == {"timeout": datetime.timedelta(minutes=7), "wait_all_ranks": True}
