"""What a run reports: a console line, `metrics.jsonl`, TensorBoard scalars and images.

    writer = MetricsWriter(workdir, config, enabled=jax.process_index() == 0)
    writer.step(step, metrics, bucket, seconds, flops, timed)   # every step; logs every log_every
    writer.images(step, "validation", imgs)  # uint8 [N, H, W, 3] -> PNGs + TensorBoard
    writer.scalars(step, "validation", {"psnr": 31.2})   # -> console, validation/metrics.jsonl, TensorBoard

The run's config goes to `config.json` (the seed included). One JSON object per logged step: `step`,
`loss`, `lr`, `grad_norm`, `images_per_s`, `step_time_s`, `eta_s`, `skipped_total`, and, once known,
`flops_per_step` (model FLOPs of all devices: `step.model_flops`) and `mfu` (against
`config.peak_flops_per_device`). The console line adds an adversarial objective's discriminator and
generator losses (`d_loss`, `g_loss`) when the metrics have them. Only process 0 writes.
"""

import json
from collections import Counter

import jax
import numpy as np

from sdxl_jax import storage
from sdxl_jax.train.tensorboard import EventWriter, png


class MetricsWriter:
    def __init__(self, workdir, config, *, enabled: bool):
        self.workdir, self.enabled = storage.path(workdir), enabled
        self.log_every, self.num_steps, self.batch_size = config.log_every, config.num_steps, config.batch_size
        self.peak = config.peak_flops_per_device * jax.device_count()
        self.buckets = Counter()
        self._times, self._flops = [], []
        if enabled:
            storage.make_dirs(self.workdir)
            (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
            self._jsonl = storage.AppendFile(self.workdir / "metrics.jsonl")  # on a bucket: uploaded at each flush
            self._tb = EventWriter(self.workdir / "tensorboard")

    def step(
        self, step: int, metrics: dict, bucket: str, seconds: float, flops_per_step: float, timed: bool
    ) -> dict | None:
        """Record step `step` (1-based, after it ran; `seconds` from fetching its batch to its metrics on
        the host; `flops_per_step` the model FLOPs of all devices together; `timed` False for a step that
        compiled) and log it if due; returns the logged record."""
        if timed:
            self._times.append(seconds)
            self._flops.append(flops_per_step)
        self.buckets[bucket] += 1
        if step % self.log_every and step != self.num_steps:
            return None
        record = {"step": step, **{k: float(np.asarray(v)) for k, v in metrics.items()}}
        if self._times:
            step_time, flops = float(np.mean(self._times)), float(np.mean(self._flops))
            record |= {
                "step_time_s": step_time,
                "images_per_s": self.batch_size / step_time,
                "eta_s": step_time * (self.num_steps - step),
                "flops_per_step": flops,
                "mfu": flops / step_time / self.peak,
            }
        self._times, self._flops = [], []
        if self.enabled:
            self._write(step, record)
        return record

    def _write(self, step: int, record: dict) -> None:
        line = (
            f"step {step}/{self.num_steps} loss {record['loss']:.4f} lr {record['lr']:.3g} "
            f"grad_norm {record['grad_norm']:.3f}"
        )
        if "d_loss" in record:
            line += f" d_loss {record['d_loss']:.4f} g_loss {record['g_loss']:.4f}"
        if "step_time_s" in record:
            line += f" {record['images_per_s']:.2f} img/s {record['step_time_s']:.3f} s/step ETA {record['eta_s']:.0f}s"
        if "mfu" in record:
            line += f" MFU {100 * record['mfu']:.1f}%"
        print(line, flush=True)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {f"train/{k}": v for k, v in record.items() if k != "step"}
        scalars |= {f"buckets/{name}": n for name, n in self.buckets.items()}
        self._tb.scalars(step, scalars)
        self._tb.flush()

    def images(self, step: int, name: str, images: np.ndarray) -> None:
        if not self.enabled:
            return
        folder = self.workdir / name / f"step_{step:08d}"
        storage.make_dirs(folder)
        for i, image in enumerate(images):
            (folder / f"{i:02d}.png").write_bytes(png(image))
            self._tb.image(step, f"{name}/{i}", image)
        self._tb.flush()

    def scalars(self, step: int, name: str, values: dict[str, float]) -> None:
        """Scalars of a pass such as validation: one console line, a row of `NAME/metrics.jsonl`,
        TensorBoard's `NAME/<key>`. Nothing for an empty dict."""
        if not self.enabled or not values:
            return
        print(f"step {step} {name}: " + " ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)
        storage.make_dirs(self.workdir / name)
        rows = storage.AppendFile(self.workdir / name / "metrics.jsonl")
        rows.write(json.dumps({"step": step, **values}) + "\n")
        rows.close()
        self._tb.scalars(step, {f"{name}/{k}": v for k, v in values.items()})
        self._tb.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
