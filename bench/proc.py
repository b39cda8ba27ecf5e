"""Start one measurement as ``world`` fresh ``python -m bench.worker`` processes and collect them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(spec: dict[str, Any], world: int, timeout: float = 900) -> list[dict[str, Any]]:
    """Run ``spec`` on ``world`` new processes (a gloo job when ``world`` > 1); per-rank results.

    Raises:
        RuntimeError: a rank failed (its stderr tail included) or the run timed out.
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec = {**spec, "result": str(Path(tmp) / "result")}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        port = _free_port()
        procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
            err = open(Path(tmp) / f"stderr.{rank}", "w+")
            procs.append((subprocess.Popen([sys.executable, "-m", "bench.worker", str(spec_path)], env=env,
                                           stdout=err, stderr=subprocess.STDOUT), err))
        failed = []
        for rank, (p, err) in enumerate(procs):
            try:
                code = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q, _ in procs:
                    q.kill()
                code = "timeout"
            if code != 0:
                err.seek(0)
                failed.append(f"rank {rank} exited {code}:\n{err.read()[-3000:]}")
            err.close()
        if failed:
            raise RuntimeError(f"{spec.get('case', 'disk')} failed:\n" + "\n".join(failed))
        return [json.loads(Path(f"{spec['result']}.{r}.json").read_text()) for r in range(world)]
