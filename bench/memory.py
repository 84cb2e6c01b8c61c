"""Peak memory and time of real-size SDXL base on this machine: reading, loading, sampling, converting.

    python bench/memory.py [--workdir /tmp/sdxl_memory_bench] [--only load_bf16,generate_1024_fp32,...]

1. Writes `sdxl_base_random_fp16.safetensors` (~6.9 GB, every tensor of the real base single file with
   fp16 random values; `bench/convert.py`'s generator) and converts it once to this project's format.
2. Runs each job in its own process and reports its wall time and peak RSS (`os.wait4`'s ru_maxrss,
   with the peak anonymous and file-backed parts sampled from /proc), plus what the job prints:
     read             every tensor of the single file read into memory, one at a time
     read_project     every file of the project checkpoint, read front to back
     load_{fp32,bf16} `Pipeline.load(project checkpoint)`; RSS after loading; `_single` from the file.
                      With the persistent compilation cache in the workdir, as `sample.py` has it;
                      `load_bf16_single_first` without one (a first load: every layout program compiled)
     generate_{512,1024}_{fp32,bf16}[_b4]
                      the README's `sample.py` command on the project checkpoint: 1 image (4 with _b4),
                      2 Euler steps, CFG 5; its log's compiled-program memory and batch time
     convert_{in,out} `python -m sdxl_jax.convert` single file -> project format, and back
     diffusers_1024_fp32
                      diffusers' `StableDiffusionXLPipeline.from_single_file` (local configs, fp32) +
                      the same generation, for reference
Read and load jobs find the checkpoint files in the page cache (`--page_cache warm`, the default) or
on the disk only (`cold`: stored as `<job>_cold`). Weights are random: images are noise; memory and time
are those of the real model. Other jobs on the machine share its cores, memory and page cache: run it
alone.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from convert import random_tensors, timed  # noqa: E402  (bench/convert.py, beside this file)

GiB = 2**30
PROMPT = "a photo of an astronaut riding a horse"


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- jobs (each runs in its own process) ------------------------------------------------------------


def job_read(args) -> dict:
    from sdxl_jax.convert.files import LazySafetensors

    start, state, total = time.perf_counter(), LazySafetensors(args.single_file), 0
    for key in state:
        total += state[key].nbytes
    return dict(bytes=total, read_s=time.perf_counter() - start)


def job_read_project(args) -> dict:
    """Every file of the project checkpoint, read front to back into one reused buffer."""
    start, total, buffer = time.perf_counter(), 0, bytearray(64 * 2**20)
    for path in sorted(p for p in args.project.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return dict(bytes=total, read_s=time.perf_counter() - start)


def _load(args, path, dtype):
    import jax

    from sdxl_jax.pipeline import Pipeline

    if args.compilation_cache != "none":  # as sample.py does
        from sdxl_jax.compilation import enable_compilation_cache

        enable_compilation_cache(args.compilation_cache)
    start = time.perf_counter()
    pipe = Pipeline.load(path, dtype=dtype)
    weights = sum(x.nbytes for x in jax.tree.leaves(pipe.models))
    return pipe, dict(load_s=time.perf_counter() - start, rss_after_load=rss(), weights_bytes=weights)


def job_load(args) -> dict:
    return _load(args, args.single_file if args.source == "single" else args.project, args.dtype)[1]


def job_diffusers(args) -> dict:
    import torch
    from diffusers import StableDiffusionXLPipeline

    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_single_file(
        args.single_file, config=str(args.diffusers_configs), local_files_only=True, torch_dtype=torch.float32
    )
    out = dict(load_s=time.perf_counter() - start, rss_after_load=rss())
    start = time.perf_counter()
    image = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, height=args.size, width=args.size,
                 generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    out["generate_s"] = time.perf_counter() - start
    out["images"] = list(np.shape(image))
    return out


JOBS = {"read": job_read, "read_project": job_read_project, "load": job_load, "diffusers": job_diffusers}


# ---- the driver -------------------------------------------------------------------------------------


def drop_from_page_cache(files) -> None:
    """Evict the files' pages from the kernel's page cache, so the next read comes from the disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(files) -> None:
    """Read the files once, so the next read finds them in the page cache."""
    buffer = bytearray(64 * 2**20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def diffusers_configs(folder: Path) -> None:
    """A diffusers SDXL base folder without weights (configs, tokenizers, scheduler): what
    `from_single_file(config=...)` needs offline."""
    from sdxl_jax.convert import export
    from sdxl_jax.convert.pipeline_weights import MODEL_COMPONENTS, PipelineWeights
    from sdxl_jax.convert.single_file import LAYOUTS

    layout = LAYOUTS["base"]()
    weights = PipelineWeights("base", {name: (getattr(layout, name), {}) for name in MODEL_COMPONENTS["base"]})
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in MODEL_COMPONENTS["base"]:
        (tmp / name).mkdir(parents=True)
        (tmp / name / "config.json").write_text(json.dumps(export.component_config(name, weights, "float32")))
    for tokenizer in export.TOKENIZERS.values():
        export.write_tokenizer(tmp / tokenizer, export.TOKENIZER_PAD[tokenizer])
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(export.SCHEDULER_CONFIG))
    (tmp / "model_index.json").write_text(json.dumps(export.model_index(weights)))
    tmp.rename(folder)


def sample_py(work: Path, dtype: str, size: int, n: int) -> list[str]:
    """The README's real-weights command (2 Euler steps, CFG 5, one batch of n), `-v 0` for its log."""
    return [sys.executable, str(HERE.parent / "sample.py"), "--config", str(HERE.parent / "configs" / "sdxl_base.py"),
            f"--config.checkpoint={work / 'ckpt'}", f"--config.dtype={dtype}", "--prompt", PROMPT, "--n", str(n),
            "--steps", "2", "--height", str(size), "--width", str(size),
            "--outdir", str(work / f"out_{dtype}_{size}_{n}"),
            "--config.compilation_cache=none", "-v", "0"]  # fmt: skip


def plan(work: Path) -> dict[str, list[str]]:
    """Job name -> its command line."""
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--workdir", str(work)]
    jobs = {"read": me + ["--job", "read"] + common, "read_project": me + ["--job", "read_project"] + common}
    load = me + ["--job", "load"] + common
    # a first load: no compilation cache
    jobs["load_bf16_single_first"] = load + ["--dtype", "bf16", "--source", "single"]
    load += ["--compilation_cache", str(work / "xla_cache")]
    for dtype in ("fp32", "bf16"):
        jobs[f"load_{dtype}"] = load + ["--dtype", dtype]
        jobs[f"load_{dtype}_single"] = load + ["--dtype", dtype, "--source", "single"]
        for size in (512, 1024):
            jobs[f"generate_{size}_{dtype}"] = sample_py(work, dtype, size, 1)
    jobs["generate_1024_bf16_b4"] = sample_py(work, "bf16", 1024, 4)
    back = work / "back.safetensors"
    convert = [sys.executable, "-m", "sdxl_jax.convert"]
    jobs["convert_in"] = convert + [str(work / "sdxl_base_random_fp16.safetensors"), str(work / "ckpt_again")]
    jobs["convert_out"] = convert + [str(work / "ckpt"), str(back), "--to", "single-file"]
    jobs["diffusers_1024_fp32"] = me + ["--job", "diffusers", "--size", "1024"] + common
    return jobs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdxl_memory_bench"))
    parser.add_argument("--only", default="", help="comma-separated job names (default: all)")
    parser.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--source", default="project", help=argparse.SUPPRESS)
    parser.add_argument("--compilation_cache", default="none", help=argparse.SUPPRESS)
    parser.add_argument(
        "--page_cache",
        choices=("warm", "cold"),
        default="warm",
        help="before each read/load job, the checkpoint files are read once (warm) or dropped from the "
        "page cache (cold: posix_fadvise DONTNEED); results are stored per mode",
    )
    args = parser.parse_args()
    work = args.workdir
    args.single_file = work / "sdxl_base_random_fp16.safetensors"
    args.project, args.diffusers_configs = work / "ckpt", work / "diffusers_configs"
    if args.job:  # a worker: print one JSON line
        print("RESULT " + json.dumps(JOBS[args.job](args)), flush=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    if not args.single_file.exists():
        from sdxl_jax.convert.export import write_safetensors

        print(f"writing {args.single_file} ...", flush=True)
        write_safetensors(args.single_file.with_suffix(".tmp"), random_tensors(), {"format": "pt"})
        args.single_file.with_suffix(".tmp").rename(args.single_file)
    if not args.project.exists():
        subprocess.run([sys.executable, "-m", "sdxl_jax.convert", str(args.single_file), str(args.project)], check=True)
    if not args.diffusers_configs.exists():
        diffusers_configs(args.diffusers_configs)
    jobs = plan(work)
    chosen = [j for j in args.only.split(",") if j] or list(jobs)
    if unknown := set(chosen) - set(jobs):
        raise SystemExit(f"unknown jobs {sorted(unknown)}; known: {', '.join(jobs)}")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    os.environ.update(env)
    results = {}
    for name in chosen:
        shutil.rmtree(work / "ckpt_again", ignore_errors=True)
        (work / "back.safetensors").unlink(missing_ok=True)
        if name.startswith(("read", "load")):
            files = [args.single_file] + sorted(p for p in args.project.rglob("*") if p.is_file())
            (drop_from_page_cache if args.page_cache == "cold" else read_through)(files)
        if name.startswith(("read", "load")) and args.page_cache == "cold":
            name = name + "_cold"
        log = work / f"{name}.log"
        load = os.getloadavg()[0]
        try:
            figures = timed(jobs[name.removesuffix("_cold")], log)
        except SystemExit as e:  # timed() exits on a failed job: record it (e.g. killed for memory), go on
            figures = dict(failed=str(e)[-400:])
        lines = log.read_text().splitlines()
        printed = [line for line in lines if line.startswith("RESULT ")]
        figures |= json.loads(printed[-1][7:]) if printed else {}
        for line in lines:
            if "compiled the generation program" in line:
                figures["program"] = line.split("] ", 1)[-1]
            elif line.startswith("batch "):
                figures["batch"] = line
        results[name] = figures
        shown = {k: (f"{v / GiB:.2f} GiB" if ("rss" in k or "bytes" in k) and isinstance(v, int) else v)
                 for k, v in figures.items() if k not in ("user_s", "sys_s")}  # fmt: skip
        print(f"{name} (load avg {load:.1f}): " + json.dumps(shown, default=str), flush=True)
    stored = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
    (work / "results.json").write_text(json.dumps(stored | results, indent=1))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
