"""Running a worker script on 2 CPU processes under torch.distributed.run (gloo), as the
sharded-training tests of the integrations do: the frameworks see an external launcher
and start nothing themselves."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).parent


def run_two(tmp_path: Path, script: str, *argv: str) -> None:
    """``script`` (written to ``tmp_path/worker.py``) on 2 processes, with ``tmp_path`` and
    ``argv`` as its arguments and ``NNMARK_TESTS_DIR`` set; fails the test if it fails."""
    (tmp_path / "worker.py").write_text(script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NNMARK_TESTS_DIR": str(TESTS_DIR), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), str(tmp_path / "worker.py"), str(tmp_path), *argv],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
