"""Child processes of tests: their environment (with fake CPU devices), several scripts run in one child,
a free port for a coordinator."""

import json
import os
import socket
import subprocess
import sys


def child_env(devices: int = 1) -> dict:
    """This process's environment (XLA flags and compilation cache from conftest) with `devices` CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs several scripts in one process (one JAX start, one set of devices): `python -c PARTS JSON`, where
# JSON maps a name to a script; prints one JSON line per script: its name, "ok" or its traceback, its stdout.
PARTS = """
import contextlib, io, json, sys, traceback
for name, code in json.loads(sys.argv[1]).items():
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {"__name__": name})
        status = "ok"
    except BaseException:
        status = traceback.format_exc()
    print("PART " + json.dumps({"name": name, "status": status, "stdout": out.getvalue()}), flush=True)
"""


def run_parts(scripts: dict[str, str], devices: int = 1, timeout: int = 600) -> dict[str, dict]:
    """Each script run in turn in one child with `devices` fake CPU devices -> name -> {"status", "stdout"}
    (status "ok" or the script's traceback; a crash of the child itself fails here)."""
    result = subprocess.run([sys.executable, "-c", PARTS, json.dumps(scripts)], env=child_env(devices),
                            capture_output=True, text=True, timeout=timeout)  # fmt: skip
    parts = [json.loads(line[5:]) for line in result.stdout.splitlines() if line.startswith("PART ")]
    assert result.returncode == 0 and len(parts) == len(scripts), result.stdout[-3000:] + result.stderr[-5000:]
    return {part.pop("name"): part for part in parts}
