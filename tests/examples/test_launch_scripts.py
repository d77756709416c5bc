"""The multi-node launch scripts: ``examples/vgpo_qwen25vl_32b.sh`` and its SLURM wrapper.

The scripts run for real under bash. Where a cluster is needed, tiny fakes of ``torchrun``,
``nvidia-smi``, ``scontrol`` and ``srun`` come first on PATH; each appends its argv, working
directory and the environment it saw to a JSON-lines log, so the tests assert the exact launch
arguments every node would get. Where no cluster is needed the real ``torchrun`` and the real
``python -m megatron_vgpo.train --dry-run`` run, and the tests read the layout they print.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_vgpo.distributed.parallel import free_port

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "examples" / "vgpo_qwen25vl_32b.sh"
SBATCH = REPO / "examples" / "slurm" / "vgpo_qwen25vl_32b.sbatch"
CONFIG_32B = "examples/configs/qwen25vl_32b.yaml"

# Set by torchrun, SLURM or an earlier launch: none may leak in from the environment pytest runs in.
LAUNCH_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES",
              "CONFIG", "PYTHON", "TORCHRUN", "CUDA_DEVICE_MAX_CONNECTIONS", "REPO", "CKPT_DIR", "LOG_DIR",
              "SRUN_ARGS")
SEEN_ENV = ("CUDA_DEVICE_MAX_CONNECTIONS", "NODE_RANK", "SLURM_NODEID")

_RECORD = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": {name!r}, "argv": sys.argv[1:], "cwd": os.getcwd(),
                        "env": {{k: os.environ.get(k) for k in {seen!r}}}}}) + "\\n")
"""

# srun: skip its own options, then run the command once per node, as SLURM would on each node.
_SRUN = """import subprocess
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
for node in range(int(os.environ["SLURM_NNODES"])):
    rc = subprocess.call(args, env={**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node)})
    if rc:
        sys.exit(rc)
"""


def fake_tool(bin_dir: Path, name: str, body: str = "") -> None:
    """An executable ``bin_dir/name`` that logs its call to $FAKE_LOG, then runs ``body`` (Python)."""
    path = bin_dir / name
    path.write_text(_RECORD.format(python=sys.executable, name=name, seen=SEEN_ENV) + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def calls(log: Path, tool: str) -> list[dict]:
    if not log.exists():
        return []
    return [c for c in map(json.loads, log.read_text().splitlines()) if c["tool"] == tool]


@pytest.fixture
def fakes(tmp_path):
    """``(env, log)``: a clean environment whose PATH starts with a fake ``torchrun``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    fake_tool(bin_dir, "torchrun")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log))
    return env, log


def run(cmd: list, env: dict, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_scripts_parse_and_are_executable():
    # torchrun --no-python executes the launch script itself, and SLURM runs the batch file.
    for script in (LAUNCH, SBATCH):
        r = run(["bash", "-n", script], os.environ, REPO)
        assert r.returncode == 0, r.stderr
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_multinode_torchrun_arguments(fakes, tmp_path):
    env, log = fakes
    env.update(NNODES="4", NODE_RANK="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234", GPUS_PER_NODE="8")
    r = run(["bash", LAUNCH, "trainer.total_steps=10", "--dry-run"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (call,) = calls(log, "torchrun")
    assert call["argv"] == ["--nnodes", "4", "--node-rank", "2", "--master-addr", "10.0.0.1",
                            "--master-port", "1234", "--nproc-per-node", "8", "--max-restarts", "3", "-m",
                            "megatron_vgpo.train",
                            "--config", CONFIG_32B, "trainer.total_steps=10", "--dry-run"]
    assert call["cwd"] == str(REPO)  # relative config paths resolve against the repository
    assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "torchrun --nnodes 4 --node-rank 2 --master-addr 10.0.0.1" in r.stderr  # the printed launch line


@pytest.mark.parametrize("visible,smi_lines,expected", [
    (None, ["GPU 0: NVIDIA H100 (UUID: a)", "GPU 1: NVIDIA H100 (UUID: b)", "  MIG 3g.40gb Device 0: (UUID: c)",
            "GPU 2: NVIDIA H100 (UUID: d)"], "3"),
    ("0,1", ["GPU 0: NVIDIA H100 (UUID: a)"] * 8, "2"),
    (None, None, "8"),  # nvidia-smi fails (no driver): the 8-GPU default
], ids=["nvidia-smi", "cuda-visible-devices", "no-gpu-query"])
def test_defaults_and_gpu_count(fakes, tmp_path, visible, smi_lines, expected):
    env, log = fakes
    body = "print(%r)" % "\n".join(smi_lines) if smi_lines else "sys.exit(9)"
    fake_tool(Path(env["PATH"].split(os.pathsep)[0]), "nvidia-smi", body)
    if visible:
        env["CUDA_VISIBLE_DEVICES"] = visible
    env.update(CONFIG="examples/configs/qwen25vl_7b.yaml", CUDA_DEVICE_MAX_CONNECTIONS="4")
    r = run(["bash", LAUNCH], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (call,) = calls(log, "torchrun")
    assert call["argv"] == ["--nnodes", "1", "--node-rank", "0", "--master-addr", "127.0.0.1",
                            "--master-port", "29500", "--nproc-per-node", expected, "--max-restarts", "3", "-m",
                            "megatron_vgpo.train",
                            "--config", "examples/configs/qwen25vl_7b.yaml"]
    assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "4"  # the user's value wins


@pytest.mark.parametrize("torchrun_env", [
    dict(TORCHELASTIC_RUN_ID="job7", WORLD_SIZE="32", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="8"),
    dict(WORLD_SIZE="32", RANK="9", LOCAL_RANK="1"),  # another launcher with torchrun's variables
], ids=["torchelastic", "rank-variables"])
def test_under_torchrun_runs_the_trainer_directly(fakes, tmp_path, torchrun_env):
    env, log = fakes
    env.update(torchrun_env, MASTER_ADDR="10.0.0.1", MASTER_PORT="1234", PYTHON=sys.executable)
    r = run(["bash", LAUNCH, "trainer.total_steps=7", "--dry-run"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert calls(log, "torchrun") == [], "nested torchrun"
    assert r.stdout.rstrip().endswith("# parallel layout: world size 32 = TP 8 x PP 2 x DP 2")
    resolved = yaml.safe_load(r.stdout)
    assert resolved["trainer"]["total_steps"] == 7 and resolved["parallel"]["tensor_model_parallel_size"] == 8
    # Only each node's first worker prints the launch line.
    assert ("-m megatron_vgpo.train --config" in r.stderr) == (torchrun_env["LOCAL_RANK"] == "0")


def test_under_torchrun_config_errors_exit_nonzero(fakes, tmp_path):
    env, _ = fakes
    env.update(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="12", RANK="0", LOCAL_RANK="0", PYTHON=sys.executable)
    r = run(["bash", LAUNCH, "--dry-run"], env, cwd=tmp_path)
    assert r.returncode == 2 and "world size 12 is not divisible" in r.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["script-starts-torchrun", "torchrun-starts-script"])
def test_real_torchrun_two_workers_dry_run(tmp_path, mode):
    """Both directions with the real torchrun: each of the 2 workers prints the DP 2 layout."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    bin_dir = Path(sys.executable).parent
    torchrun = shutil.which("torchrun", path=str(bin_dir))
    torchrun_cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", PYTHON=sys.executable,
               CONFIG="examples/configs/cpu_tiny.yaml", TORCHRUN=" ".join(torchrun_cmd))
    port = str(free_port())
    if mode == "script-starts-torchrun":
        env.update(NNODES="1", GPUS_PER_NODE="2", MASTER_PORT=port)
        cmd = ["bash", LAUNCH, "trainer.total_steps=3", "--dry-run"]
    else:
        cmd = [*torchrun_cmd, "--nproc-per-node", "2", "--master-port", port, "--no-python",
               LAUNCH, "trainer.total_steps=3", "--dry-run"]
    r = run(cmd, env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("# parallel layout: world size 2 = TP 1 x PP 1 x DP 2") == 2, r.stdout
    assert r.stdout.count("total_steps: 3") == 2


def test_sbatch_directives_reach_slurm():
    """sbatch reads #SBATCH lines only up to the first command: the allocation must be declared there."""
    directives = []
    for line in SBATCH.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            directives += line.split()[1:]
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--signal=B:USR1@600"} <= set(
        directives)


def test_sbatch_time_limit_signal_writes_the_stop_file(fakes, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@600 sends) while srun runs: the trap writes
    the STOP file into the checkpoint directory, the shell keeps waiting for the run, and exits with
    the run's status. The fake srun here stands for a run that notices the file and exits 0."""
    env, log = fakes
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    fake_tool(bin_dir, "scontrol", 'print("n1")\n')
    ckpt = tmp_path / "ckpt"
    fake_tool(bin_dir, "srun", "import time\nfrom pathlib import Path\nstop = Path(os.environ['CKPT_DIR']) / 'STOP'\n"
                               "t0 = time.time()\nwhile not stop.exists():\n    time.sleep(0.05)\n"
                               "    assert time.time() - t0 < 60, 'no STOP file'\n")
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", SLURM_SUBMIT_DIR=str(REPO),
               CKPT_DIR=str(ckpt))
    proc = subprocess.Popen(["bash", str(SBATCH)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 30
    while not calls(log, "srun") and time.time() < deadline:  # srun started: the trap is set just after
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(__import__("signal").SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (ckpt / "STOP").exists() and "asking the run to save and stop" in err


@pytest.mark.parametrize("where", ["spool-copy", "in-repo"])
def test_sbatch_launches_every_node(fakes, tmp_path, where):
    env, log = fakes
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    fake_tool(bin_dir, "scontrol", 'assert sys.argv[1:] == ["show", "hostnames", "gpu-[017-020]"]\n'
                                   'print("gpu-017\\ngpu-018\\ngpu-019\\ngpu-020")\n')
    fake_tool(bin_dir, "srun", _SRUN)
    script = SBATCH
    if where == "spool-copy":  # what sbatch really runs: a copy in slurmd's spool, found via the submit dir
        script = tmp_path / "spool" / "job4242" / "slurm_script"
        script.parent.mkdir(parents=True)
        shutil.copy(SBATCH, script)
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-[017-020]", SLURM_NNODES="4", SLURM_NODEID="0",
               SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_ON_NODE="96", SLURM_SUBMIT_DIR=str(REPO),
               CKPT_DIR="/lustre/me/ckpt")
    r = run(["bash", script, "trainer.total_steps=10"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    (srun,) = calls(log, "srun")
    assert srun["argv"][:4] == ["--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=96", "--kill-on-bad-exit=1"]
    launches = calls(log, "torchrun")
    assert [c["env"]["SLURM_NODEID"] for c in launches] == ["0", "1", "2", "3"]
    for node, call in enumerate(launches):
        assert call["argv"] == ["--nnodes", "4", "--node-rank", str(node), "--master-addr", "gpu-017",
                                "--master-port", str(20000 + 4242), "--nproc-per-node", "8", "--max-restarts", "3",
                                "-m", "megatron_vgpo.train", "--config", CONFIG_32B,
                                "checkpoint.save_dir=/lustre/me/ckpt", "trainer.total_steps=10"]
        assert call["cwd"] == str(REPO)


def test_sbatch_without_repository_fails_clearly(fakes, tmp_path):
    env, log = fakes
    script = tmp_path / "slurm_script"
    shutil.copy(SBATCH, script)
    env.update(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", SLURM_SUBMIT_DIR=str(tmp_path))
    r = run(["bash", script], env, cwd=tmp_path)
    assert r.returncode == 1 and "cannot find the repository" in r.stderr
    assert calls(log, "torchrun") == []
