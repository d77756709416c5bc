"""Run ``examples/quickstart_cpu.sh`` for its layout only: a copy of the script and of its config in a
scratch repository, with a fake ``python`` first on PATH.

The fake stands in for the two tools (it writes what they write, in miniature: the model directory's
``config.json``, which the script tests for, and the real synthetic files, 4 rows each) and for the
trainer (it records the trainer's arguments to a JSON-lines log instead of training).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path("examples") / "quickstart_cpu.sh"
CONFIG = Path("examples") / "configs" / "cpu_tiny.yaml"

_FAKE_PYTHON = """#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"argv": args, "cwd": os.getcwd()}}) + "\\n")
out = Path(args[args.index("--output") + 1]) if "--output" in args else None
if args[0] == "tools/make_tiny_qwen25vl.py":
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text("{{}}")
elif args[0] == "tools/make_synthetic_dataset.py":
    from megatron_vgpo.data.synthetic import write_synthetic_dataset
    write_synthetic_dataset(out, train=4, val=4, seed=0)
elif args[:2] != ["-m", "megatron_vgpo.train"]:
    sys.exit("fake python: unexpected call " + " ".join(args))
"""


def run_quickstart(root: Path, *trainer_args: str, out: str | None = None) -> list[dict]:
    """Lay out a scratch repository in ``root``, run the quickstart there (``OUT=out`` when given) and
    return the fake python's calls (``{"argv", "cwd"}``), the trainer's last."""
    for path in (SCRIPT, CONFIG):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, root / path)
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text(_FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = root / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    if out is not None:
        env["OUT"] = out
    r = subprocess.run(["bash", str(root / SCRIPT), *trainer_args], env=env, cwd=root / "examples",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]
