"""`sdxl-convert SRC DST` (or `python -m sdxl_jax.convert`): SDXL weights from any PyTorch layout to this
project's format, or back.

    sdxl-convert sd_xl_base_1.0.safetensors ckpt/                      # -> this project's format (Orbax)
    sdxl-convert stable-diffusion-xl-base-1.0/ ckpt/ --variant fp16    # a diffusers folder, its fp16 files
    sdxl-convert ckpt/ sdxl_tuned.safetensors --to single-file         # -> ComfyUI, the SD web UIs
    sdxl-convert ckpt/ sdxl_tuned/ --to diffusers --dtype fp16         # -> diffusers from_pretrained
    sdxl-convert sd_xl_base_1.0.safetensors styled.safetensors --to single-file --lora style.safetensors:0.8

SRC: a single-file checkpoint (`.safetensors`, or a weights-only `.ckpt`/`.pt` pickle), a diffusers
folder, or this project's checkpoint folder. DST must not exist; it appears only once complete.
Progress goes to stderr, then one summary line to stdout. Any error: a one-line message on stderr and
exit code 1 (`--debug` adds the traceback); a usage error exits with 2.
"""

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

import jax

from sdxl_jax import storage
from sdxl_jax.convert import export
from sdxl_jax.convert import pipeline_weights as pw
from sdxl_jax.convert.lora import merge_loras, parse_lora

TARGETS = ("jax", "diffusers", "single-file")
_MAX_MESSAGE = 1000  # characters of an error message shown without --debug


class Summary(NamedTuple):
    destination: Path
    tensors: int
    parameters: int
    bytes: int
    seconds: float

    def line(self, source, target: str) -> str:
        return (f"{source} -> {self.destination} ({target}): {self.tensors} tensors, {self.parameters:,} parameters, "
                f"{self.bytes / 1e9:.2f} GB in {self.seconds:.1f} s")  # fmt: skip


class ProgressBar:
    """A progress bar over the tensors an export writes (`export.Progress`), on a terminal redrawn in
    place; elsewhere (logs, pipes) one line per finished component."""

    def __init__(self, stream: TextIO, interactive: bool | None = None, width: int = 30):
        self.stream, self.width = stream, width
        self.interactive = stream.isatty() if interactive is None else interactive
        self.component, self.tensors, self.last_draw, self.start = None, 0, 0.0, time.perf_counter()

    def __call__(self, p) -> None:
        done = p.tensors == p.total_tensors
        if self.interactive:
            now = time.perf_counter()
            if done or p.component != self.component or now - self.last_draw > 0.1:
                filled = self.width * p.bytes // max(p.total_bytes, 1)
                bar = "#" * filled + "-" * (self.width - filled)
                count = f"{p.tensors}/{p.total_tensors} tensors {p.bytes / 1e9:.2f}/{p.total_bytes / 1e9:.2f} GB"
                line = f"\r  {p.component:<15} [{bar}] {count} {now - self.start:.0f} s"
                self.stream.write(line + ("\n" if done else ""))
                self.last_draw = now
        else:
            if self.component is not None and p.component != self.component:
                self._line(self.component, self.tensors, p.total_tensors)
            if done:
                self._line(p.component, p.tensors, p.total_tensors)
        self.component, self.tensors = p.component, p.tensors
        self.stream.flush()

    def _line(self, component: str, tensors: int, total: int) -> None:
        seconds = time.perf_counter() - self.start
        self.stream.write(f"  {component} written: {tensors}/{total} tensors, {seconds:.1f} s\n")


def convert(src, dst, to: str = "jax", dtype: str | None = None, model: str | None = None,
            variant: str | None = None, log: TextIO | None = None, loras: Sequence[tuple[str, float]] = (),
            lora_strict: bool = True) -> Summary:  # fmt: skip
    """Convert `src` (anything `load_pipeline_weights` reads) to `dst` as `to` (jax|diffusers|single-file).
    dtype: fp32|bf16|fp16 cast (default: as stored); model: base|refiner, checked; variant: a diffusers
    folder's weight variant (e.g. fp16); loras: `(path, scale)` LoRA files baked into the weights
    (`lora.merge_loras`). Progress and phases are written to `log` (default: stderr)."""
    log = sys.stderr if log is None else log
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    src, dst = storage.absolute(src), storage.absolute(dst)  # Orbax wants absolute paths; URLs stay
    if to == "single-file" and dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: a single-file output must be named *.safetensors")
    storage.check_readable(src, "source")
    storage.check_writable(dst.parent, "destination folder")  # before the minutes of reading
    if dst.exists():
        raise FileExistsError(f"{dst} exists; refusing to overwrite it")
    if variant is not None and not pw.is_diffusers_folder(src):
        raise ValueError(f"--variant applies to a diffusers folder (with model_index.json); {src} is not one")
    start = time.perf_counter()
    log.write(f"reading {src}\n")
    # The project format stores its dtype in the configs, so it is cast on loading; an export casts
    # tensor by tensor as it writes (no second full copy).
    weights = pw.load_pipeline_weights(src, model, dtype if to == "jax" else None, variant)
    for path, scale in loras:
        log.write(f"merging LoRA {path} at scale {scale:g}\n")
    weights = merge_loras(weights, loras, lora_strict)
    for name, (cfg, params) in weights.components.items():
        leaves = jax.tree_util.tree_leaves(params)
        count = sum(x.size for x in leaves)
        log.write(f"  {name}: {len(leaves)} tensors, {count:,} parameters, {cfg.param_dtype}\n")
    log.write(f"read an SDXL {weights.model} in {time.perf_counter() - start:.1f} s; writing {dst} ({to})\n")
    log.flush()
    if to == "jax":
        pw.save_project(weights, dst)
        tensors = sum(len(jax.tree_util.tree_leaves(p)) for _, p in weights.components.values())
        written = export.Written(dst, tensors, weights.num_parameters(), weights.num_bytes())
    else:
        write = export.export_diffusers if to == "diffusers" else export.export_single_file
        written = write(weights, dst, dtype, progress=ProgressBar(log))
    return Summary(written.path, written.tensors, written.parameters, written.bytes, time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl-convert",
        description="Convert SDXL weights between single files, diffusers folders and sdxl_jax checkpoints.",
    )
    parser.add_argument("src", help="single-file checkpoint, diffusers folder or sdxl_jax checkpoint folder")
    parser.add_argument("dst", help="output path (must not exist)")
    parser.add_argument("--to", choices=TARGETS, default="jax", help="output format (default: jax, this project's)")
    parser.add_argument("--dtype", choices=sorted(pw.DTYPES), help="cast the weights (default: keep the stored dtype)")
    parser.add_argument("--model", choices=sorted(pw.MODEL_COMPONENTS), help="fail unless SRC is this SDXL model")
    parser.add_argument("--variant", help="a diffusers folder's weights variant, e.g. fp16 (*.fp16.safetensors)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA file baked into the weights (repeatable; scale default 1)")  # fmt: skip
    parser.add_argument("--lora_strict", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-lora_strict: skip a LoRA's modules this model lacks, with a warning")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return parser


def one_line(error: BaseException) -> str:
    """An exception as one line: its message's lines joined (offender lists included), capped."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = lines[0]
    for line in lines[1:]:  # "... model:", "missing (2):", "a", "b" -> "... model: missing (2): a; b"
        text += (" " if text.endswith(":") else "; ") + line
    known = ("ConversionError", "FileNotFoundError", "FileExistsError", "ValueError")
    if type(error).__name__ not in known:
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 25] + " ... (--debug for all)"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (0 done, 1 error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the error
        return int(e.code or 0)
    if not args.debug:  # Orbax logs its background threads' failures with tracebacks; the error is ours to report
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        loras = [parse_lora(spec) for spec in args.lora]
        summary = convert(
            args.src, args.dst, args.to, args.dtype, args.model, args.variant, loras=loras, lora_strict=args.lora_strict
        )
    except KeyboardInterrupt:
        print("\nsdxl-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  every failure: one line and a non-zero exit code
        if args.debug:
            traceback.print_exc()
        print(f"sdxl-convert: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(summary.line(args.src, args.to))
    return 0
