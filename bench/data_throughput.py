"""Input-pipeline throughput: images/s into training batches, SDXL ~1024² buckets, on this machine.

    python bench/data_throughput.py [--images 96] [--batch 8] [--batches 12]

Generates JPEGs of mixed aspect ratios at 1-2.4 MP (smooth content plus noise, quality 90, roughly
the file sizes of photos), prepares them into shards, then times the grain loader with 0, 1 and 2
worker processes, and with 2 decode threads in one process (PIL decodes without holding the GIL),
from prepared shards and from the raw folder. Start-up (worker processes, tokenizer
load, first batches) is not timed. Also times the floor: a plain PIL decode + resize of a 1.9 MP JPEG.
images/CPU-s (with psutil) is images per CPU-second of the loader's processes: the per-core rate,
which unlike images/s does not depend on how busy the machine's other users keep the cores.
"""

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl_jax.data import default_data_config, make_loader
from sdxl_jax.data import prepare as prep

SETTINGS = [(0, 1), (0, 2), (1, 1), (2, 1)]  # (worker processes, decode threads per process)
SIZES = [(1200, 1600), (1600, 1200), (1024, 1024), (1280, 1920), (800, 1800), (1536, 1152)]  # (h, w), 1-2.4 MP


def photo_like(h: int, w: int, rng: np.random.Generator) -> bytes:
    """A JPEG with smooth gradients, blobs and sensor-like noise (compresses like a photo, not like flat colour)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [128 + 100 * np.sin(x / rng.uniform(40, 200) + c) * np.cos(y / rng.uniform(40, 200)) for c in range(3)], -1
    )
    img += rng.normal(0, 12, (h, w, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        (root / f"{i:05d}.jpg").write_bytes(photo_like(h, w, rng))
        (root / f"{i:05d}.txt").write_text(f"a synthetic photo number {i}, gradients, noise")


def baseline(path: Path, reps: int = 10) -> float:
    """Images/s of a plain PIL decode + resize (to the 1024² bucket's cover) of one 1.9 MP JPEG, one core."""
    data = path.read_bytes()
    t = time.perf_counter()
    for _ in range(reps):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.resize((1024, round(1024 * img.height / img.width)), Image.Resampling.LANCZOS)
    return reps / (time.perf_counter() - t)


def _cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and its live children (psutil, if installed)."""
    try:
        import psutil
    except ModuleNotFoundError:
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def throughput(
    source: str, path: Path, workers: int, batch: int, batches: int, threads: int = 1
) -> tuple[float, float | None]:
    """(images/s, images per CPU-second or None) for one configuration."""
    c = default_data_config()
    c.update(dict(source=source, path=str(path), num_workers=workers, num_threads=threads, flip_prob=0.5))
    it = make_loader(c, seed=0, global_batch_size=batch, process_index=0, process_count=1)
    try:
        for _ in range(2 * workers + 1):  # start-up: every worker process, its tokenizer, first decodes
            next(it)
        cpu, t = _cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            next(it)
        wall, cpu_end = time.perf_counter() - t, _cpu_seconds()
        per_cpu = batches * batch / (cpu_end - cpu) if cpu is not None else None
        return batches * batch / wall, per_cpu
    finally:
        if hasattr(it, "close"):
            it.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=24, help="timed batches per configuration")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sdxl_data_bench."))
    try:
        raw, shards = tmp / "raw", tmp / "prepared"
        t = time.perf_counter()
        make_folder(raw, args.images)
        print(f"generated {args.images} JPEGs (1-2.4 MP) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        t = time.perf_counter()
        prep.prepare(prep.parse_args([str(raw), str(shards), "--quiet"]))
        prep_rate = args.images / (time.perf_counter() - t)
        floor = baseline(raw / "00000.jpg")
        print(f"prepare: {prep_rate:.1f} images/s (one process)")
        print(f"baseline: PIL decode + resize of a 1.9 MP JPEG: {floor:.1f} images/s on one core")
        print(f"{'source':<10} {'workers':>7} {'threads':>7} {'images/s':>9} {'images/CPU-s':>13}")
        rates = {}
        for source, path in (("prepared", shards), ("folder", raw)):
            for workers, threads in SETTINGS:
                rate, per_cpu = throughput(source, path, workers, args.batch, args.batches, threads)
                rates[source, workers, threads] = rate
                per_cpu = f"{per_cpu:>13.1f}" if per_cpu is not None else f"{'(no psutil)':>13}"
                print(f"{source:<10} {workers:>7} {threads:>7} {rate:>9.1f} {per_cpu}", flush=True)
        single = rates["prepared", 0, 1]
        print(f"prepared / folder with 2 workers: {rates['prepared', 2, 1] / rates['folder', 2, 1]:.2f}x")
        print(
            f"prepared, 2 worker processes vs one process: {rates['prepared', 2, 1] / single:.2f}x; "
            f"2 decode threads in one process vs 1: {rates['prepared', 0, 2] / single:.2f}x"
        )
        print(
            f"target: >= 30 images/s with 2 workers from prepared shards "
            f"({'met' if rates['prepared', 2, 1] >= 30 else 'NOT met'}), >= 1.6x the single-process rate: "
            f"worker processes {'met' if rates['prepared', 2, 1] >= 1.6 * single else 'NOT met'}, "
            f"decode threads {'met' if rates['prepared', 0, 2] >= 1.6 * single else 'NOT met'}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
