"""Compile targets for the planner: fake CPU devices, or a TPU or GPU topology compiled for with no
TPU or GPU present.

    tpu:v5e:2x4   8 v5e chips (a v5e-8)        tpu:v5p:2x2x1  4 v5p chips (a v5p-8: 8 TensorCores)
    tpu:v6e:2x4   8 v6e chips (a v6e-8)        cpu:8          8 fake XLA:CPU devices
    gpu:h100:8    8 H100 SXM GPUs on one host   cpu            as many fake CPU devices as the mesh has

A TPU target's devices come from `jax.experimental.topologies.get_topology_desc` (libtpu, the `jax[tpu]`
extra, must be installed); `jit(...).lower(...).compile()` over a mesh of them runs the real TPU
compiler on this host. A GPU target's come from the same call with the CUDA plugin (`jax[cuda12]`) and
the GPU's description (`gpu_targets/*.txtpb`, a GpuTargetConfigProto), which stands in for the device
query; XLA's GPU compiler then runs as it would on that GPU, without autotuning (its default tiles).
Each chip's HBM, peak bf16 FLOP/s and HBM bandwidth (`CHIPS`) turn the compiled program into a fit
verdict and a roofline lower bound of its run time.
"""

import dataclasses
import importlib.util
import math
import os
from pathlib import Path

import jax
from jax.experimental import topologies

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's published figures: HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s; a GPU's also the
    file in `gpu_targets/` that describes it to XLA (a TPU's description is libtpu's)."""

    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    gpu_target_config: str = ""


# Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}), per chip:
# v4 275 TFLOP/s, 32 GiB at 1200 GB/s; v5e 197 TFLOP/s, 16 GB at 819 GB/s; v5p 459 TFLOP/s, 95 GB at
# 2765 GB/s; v6e (Trillium) 918 TFLOP/s, 32 GB at 1638 GB/s. Capacities are taken as GiB, as the
# runtime reports them (a v5e shows 15.75 GiB usable of 16).
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GiB, 275e12, 1200e9),
    "v5e": Chip(16 * GiB, 197e12, 819e9),
    "v5p": Chip(95 * GiB, 459e12, 2765e9),
    "v6e": Chip(32 * GiB, 918e12, 1638e9),
    # NVIDIA's H100 datasheet (nvidia.com/en-us/data-center/h100), H100 SXM: 80 GB HBM3 at 3.35 TB/s,
    # bf16 Tensor Core 1979 TFLOP/s with 2:4 sparsity, so 989 TFLOP/s dense. The capacity is what the
    # runtime reports (84942979072 bytes, 79.1 GiB; the JAX client takes 75% of it unless
    # XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise).
    "h100": Chip(84942979072, 989e12, 3350e9, "h100_sxm.txtpb"),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a program is planned: `platform` 'cpu' (fake host devices), 'tpu' (`topology`, e.g.
    'v5e:2x4') or 'gpu' (`topology` 'h100:8', GPUs on one host); `chips` the chip count,
    `devices_per_chip` 2 on a v4 without megacore, else 1."""

    platform: str
    topology: str = ""
    cpu_devices: int | None = None

    @property
    def generation(self) -> str:
        return self.topology.split(":")[0]

    @property
    def chip(self) -> Chip | None:
        return None if self.platform == "cpu" else CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.topology.split(":")[1].split("x"))

    def devices(self) -> list:
        """The target's devices: the topology's (no TPU or GPU needed) or this host's CPU devices."""
        if self.platform == "cpu":
            return jax.devices("cpu")
        if self.platform == "gpu":
            try:
                import jax_plugins.xla_cuda12  # noqa: F401  (JAX finds it on its own; this only checks)
            except ImportError as e:
                install = f'pip install "jax[cuda12]=={jax.__version__}"'
                raise RuntimeError(f"target {self} needs the CUDA plugin, not installed here: {install}") from e
            config = Path(__file__).with_name("gpu_targets") / self.chip.gpu_target_config
            # partitions x hosts per partition x devices per host
            topology = topologies.get_topology_desc(
                platform="cuda", target_config=config.read_text(), topology=f"1x1x{self.chips}"
            )
            return list(topology.devices)
        # Only libtpu's compiler is used (no TPU runtime is opened), so several planners and test workers
        # may load it at once; without this, a second process fails on libtpu's lockfile.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if importlib.util.find_spec("libtpu") is None:
            install = f'pip install "jax[tpu]=={jax.__version__}"'
            raise RuntimeError(f"target {self} needs libtpu, the TPU compiler, not installed here: {install}")
        return list(topologies.get_topology_desc(topology_name=self.topology, platform="tpu").devices)

    def per_device(self, devices: int) -> tuple[float, float, float]:
        """(HBM bytes, peak FLOP/s, HBM bytes/s) of one device, a chip's share when a chip holds several."""
        share = devices // self.chips
        chip = self.chip
        return chip.hbm_bytes / share, chip.peak_flops / share, chip.hbm_bandwidth / share

    def __str__(self) -> str:
        if self.platform != "cpu":
            return f"{self.platform}:{self.topology}"
        return "cpu" if self.cpu_devices is None else f"cpu:{self.cpu_devices}"


def parse_target(text: str) -> Target:
    """'tpu:<generation>:<AxB[xC]>', 'gpu:<generation>:<N>' or 'cpu[:N]' -> Target; anything else is
    refused with the grammar."""
    tpus = [g for g, chip in CHIPS.items() if not chip.gpu_target_config]
    gpus = [g for g, chip in CHIPS.items() if chip.gpu_target_config]
    kind, _, rest = text.partition(":")
    if kind == "cpu" and (not rest or rest.isdigit()):
        return Target("cpu", cpu_devices=int(rest) if rest else None)
    if kind in ("tpu", "gpu"):
        generation, _, dims = rest.partition(":")
        known = tpus if kind == "tpu" else gpus
        if generation not in known:
            raise ValueError(f"unknown {kind.upper()} generation {generation!r} in {text!r}; known: {', '.join(known)}")
        sizes = dims.split("x") if kind == "tpu" else [dims]
        if dims and all(d.isdigit() and int(d) > 0 for d in sizes):
            return Target(kind, rest)
    raise ValueError(
        f"target {text!r}: expected tpu:<{'|'.join(tpus)}>:<AxB[xC]> (e.g. tpu:v5e:2x4), "
        f"gpu:<{'|'.join(gpus)}>:<N> (N GPUs on one host, e.g. gpu:h100:8) or cpu[:N]"
    )


def roofline(flops: float, traffic: float, peak_flops: float, bandwidth: float) -> dict[str, float]:
    """The time bound of one device running `flops` model FLOPs and moving `traffic` HBM bytes.

    Neither resource can beat its peak, so the program takes at least max(compute, memory) seconds;
    `mfu_ceiling` is the model-FLOP utilisation at that bound (compute / bound), the most it can reach.
    """
    compute, memory = flops / peak_flops, traffic / bandwidth
    bound = max(compute, memory)
    return {"compute_s": compute, "memory_s": memory, "bound_s": bound, "mfu_ceiling": compute / bound}
