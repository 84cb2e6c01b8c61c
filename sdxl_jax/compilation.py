"""How the generation program is compiled: per platform options, kept in process and on disk, and
what the compiled program holds.

    program = compiled_generation(mesh, models, plan, inputs, latent_shape, generation.compiler_options("cpu"))
    outputs = program(models, inputs)
    enable_compilation_cache()        # ~/.cache/sdxl_jax/xla (or $SDXL_JAX_CACHE_DIR), across processes
"""

import logging
import os
import time
from pathlib import Path

import jax

from sdxl_jax import generation
from sdxl_jax.models import config as model_config
from sdxl_jax.sharding import SAMPLING_RULES, sharding_context

log = logging.getLogger("sdxl_jax")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("SDXL_JAX_CACHE_DIR") or Path(base) / "sdxl_jax" / "xla")


def enable_compilation_cache(path: str | Path | None = None) -> Path:
    """Turn on JAX's persistent compilation cache (default `default_cache_dir()`, or $SDXL_JAX_CACHE_DIR),
    so a second process compiling the same program loads it from disk instead. Every program is kept,
    however quick to compile: loading weights compiles ~100 small per-shape layout-and-cast programs,
    which together cost more than the read itself. The models' traced parameter trees are kept beside
    them (`abstract_params/`, see `models.config.use_disk_cache`): loaders need them before any read."""
    path = Path(path) if path is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    model_config.use_disk_cache(path / "abstract_params")
    return path


def platform_of(mesh: jax.sharding.Mesh) -> str:
    return mesh.devices.flat[0].platform


def memory_report(compiled) -> str:
    """A compiled program's memory per device, from XLA's `memory_analysis()` (one line)."""
    m = compiled.memory_analysis()
    if m is None:
        return "memory: not reported by this backend"
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    return (
        f"memory per device: arguments {gib(m.argument_size_in_bytes)}, temporaries {gib(m.temp_size_in_bytes)}, "
        f"outputs {gib(m.output_size_in_bytes)}"
    )


_generate_jit = jax.jit(generation.generate, static_argnums=(1, 3))
_PROGRAMS: dict = {}  # what jit's own cache would key on -> the compiled program (the last 16)


def _signature(tree) -> tuple:
    leaves, structure = jax.tree.flatten(tree)
    return structure, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


def compiled_generation(
    mesh, models: generation.Models, plan: generation.Plan, inputs: generation.Inputs, latent_shape, options=None
):
    """`generation.generate` compiled for these models, plan, input shapes and shardings and XLA options
    (`generation.compiler_options`), called as `program(models, inputs)`: compiled on first use (its
    memory logged) and kept, the last 16, as jit's own cache would (jit takes no per-call options)."""
    key = (_signature(models), plan, tuple(latent_shape), _signature(inputs), str(options))
    if key not in _PROGRAMS:
        start = time.perf_counter()
        with sharding_context(mesh, SAMPLING_RULES):
            compiled = _generate_jit.lower(models, plan, inputs, latent_shape).compile(options)
        batch = jax.tree.leaves(inputs.seeds)[0].shape[0]
        log.info("compiled the generation program (batch %d, latents %s) in %.1f s; %s",
                 batch, latent_shape, time.perf_counter() - start, memory_report(compiled))  # fmt: skip
        while len(_PROGRAMS) >= 16:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[key] = compiled
    return _PROGRAMS[key]
