"""Time and peak memory of converting a full-size SDXL base single file to this project's format and back.

    python bench/convert.py [--workdir /tmp/sdxl_convert_bench] [--keep] [--no-verify]

1. Writes `sdxl_base_random_fp16.safetensors` (~6.9 GB): every tensor of the real base single file,
   names and shapes from the key manifest (`tests/fixtures/sdxl_base_single_file_keys.json.gz`), fp16
   random values (the int64 position_ids buffer and fp32 sigmas/logit_scale as in sgm), streamed.
2. `python -m sdxl_jax.convert SRC ckpt`                              -> this project's format (Orbax)
3. `python -m sdxl_jax.convert ckpt back.safetensors --to single-file` -> the original layout again
   Each in its own subprocess: wall time, and peak RSS from `os.wait4` (ru_maxrss), with the peak
   anonymous and file-backed parts sampled from /proc (file-backed = mmapped pages of the files read).
4. Checks `back.safetensors` against the source, tensor by tensor, bit for bit (the buffers the export
   leaves out, `denoiser.sigmas` / `position_ids` / `logit_scale`, excepted).

Targets (issue 4): under 2 minutes each way, peak RSS under 12 GB. Other jobs on the machine share its
cores and disk: the load average is printed with the figures.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from sdxl_jax.convert.export import write_safetensors
from sdxl_jax.convert.single_file_keys import ignorable_keys

MANIFEST = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sdxl_base_single_file_keys.json.gz"
POOL = 1 << 24  # random fp16 values the tensors are cut from (32 MB)


class RandomTensor:
    """A tensor made when it is written: `POOL` random values from a per-tensor offset, wrapped around."""

    def __init__(self, shape, dtype, pool: np.ndarray, offset: int):
        self.shape, self.dtype, self.pool, self.offset = tuple(shape), np.dtype(dtype), pool, offset

    def __array__(self, dtype=None, copy=None):
        size = int(np.prod(self.shape, dtype=np.int64))
        out = np.empty(size, self.pool.dtype)
        done, start = 0, self.offset
        while done < size:
            take = min(size - done, len(self.pool) - start)
            out[done : done + take] = self.pool[start : start + take]
            done, start = done + take, 0
        return out.astype(dtype or self.dtype, copy=False).reshape(self.shape)


def random_tensors(seed: int = 0) -> dict:
    with gzip.open(MANIFEST, "rt") as f:
        shapes = json.load(f)["tensors"]
    rng = np.random.default_rng(seed)
    pool = (0.02 * rng.standard_normal(POOL, dtype=np.float32)).astype(np.float16)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            tensors[name] = np.arange(shape[-1], dtype=np.int64).reshape(shape)
        elif name == "denoiser.sigmas" or name.endswith("logit_scale"):
            tensors[name] = RandomTensor(shape, np.float32, np.abs(pool[:1000]) + 0.03, 0)
        else:
            tensors[name] = RandomTensor(shape, np.float16, pool, int(rng.integers(POOL)))
    return tensors


class Sampler(threading.Thread):
    """Peaks of a process's anonymous and file-backed resident memory, from /proc/PID/status."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peaks, self.done = pid, interval, {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}, False

    def run(self):
        while not self.done:
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in self.peaks:
                        self.peaks[key] = max(self.peaks[key], int(value.split()[0]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(self.interval)


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd`, output to `log`; wall seconds, peak RSS (ru_maxrss) and sampled peaks, in bytes."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.done = True
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{log.read_text()[-3000:]}")
    result = dict(seconds=seconds, peak_rss=usage.ru_maxrss * 1024, user_s=usage.ru_utime, sys_s=usage.ru_stime)
    return result | {f"peak_{k}": v for k, v in sampler.peaks.items() if k != "VmRSS"}


def verify(source: Path, back: Path) -> int:
    """Tensors compared; raises on the first difference."""
    from safetensors import safe_open

    with safe_open(source, "np") as a, safe_open(back, "np") as b:
        want = set(a.keys()) - ignorable_keys("base")
        if set(b.keys()) != want:
            raise SystemExit(f"key sets differ: {sorted(set(b.keys()) ^ want)[:10]}")
        for key in sorted(want):
            x, y = a.get_tensor(key), b.get_tensor(key)
            if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
                raise SystemExit(f"{key} differs after the round trip")
    return len(want)


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdxl_convert_bench"))
    parser.add_argument("--keep", action="store_true", help="keep the files (else removed at the end)")
    parser.add_argument("--no-verify", action="store_true", help="skip the tensor-by-tensor comparison")
    args = parser.parse_args()
    work = args.workdir
    source, ckpt, back = work / "sdxl_base_random_fp16.safetensors", work / "ckpt", work / "back.safetensors"
    work.mkdir(parents=True, exist_ok=True)
    for path in (ckpt, back):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if not source.exists():
        start = time.perf_counter()
        tmp = source.with_suffix(".tmp")
        write_safetensors(tmp, random_tensors(), {"format": "pt"})
        tmp.rename(source)
        print(f"wrote {source} ({du(source) / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
    convert_cmd = [sys.executable, "-m", "sdxl_jax.convert"]
    results = {}
    results["to_jax"] = timed(convert_cmd + [str(source), str(ckpt)], work / "to_jax.log")
    back_cmd = convert_cmd + [str(ckpt), str(back), "--to", "single-file"]
    results["to_single_file"] = timed(back_cmd, work / "to_single_file.log")
    sizes = {"source": du(source), "jax": du(ckpt), "back": du(back)}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other jobs share the machine)")
    print(f"sizes: single file {sizes['source'] / 1e9:.2f} GB, JAX checkpoint {sizes['jax'] / 1e9:.2f} GB")
    for name, r in results.items():
        print(f"{name:>15}: {r['seconds']:6.1f} s (user {r['user_s']:.0f} s, sys {r['sys_s']:.0f} s), peak RSS "
              f"{r['peak_rss'] / 1e9:.2f} GB (sampled peaks: anonymous {r['peak_RssAnon'] / 1e9:.2f} GB, "
              f"file-backed {r['peak_RssFile'] / 1e9:.2f} GB)")  # fmt: skip
        for line in (work / f"{name}.log").read_text().splitlines():
            print(f"{'':>17}| {line}")
    if not args.no_verify:
        start = time.perf_counter()
        print(f"round trip bit-exact: {verify(source, back)} tensors equal ({time.perf_counter() - start:.0f} s)")
    print(json.dumps(dict(results=results, sizes=sizes, load_average=os.getloadavg())))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
