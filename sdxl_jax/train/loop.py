"""`train(config, workdir)`: the life of a run, top to bottom.

    state = train(config, "runs/x")     # what train.py calls; tests call it in-process

processes joined -> mesh -> `StepSpec` (models, optimiser, objective, shardings) -> sharded state (or the newest
complete checkpoint) -> data -> the loop (step, log, validate, checkpoint; SIGTERM saves and stops) ->
final checkpoint -> export. Outputs in WORKDIR: checkpoints/, metrics.jsonl, config.json, tensorboard/,
validation/, export/ (with `export_on_finish`). Every objective (`config.objective`: diffusion, LoRA,
the autoencoder, ADD) runs this same loop; what differs lives in its step, state, validation and export.
"""

import time

import jax
import ml_collections

from sdxl_jax import storage
from sdxl_jax.sharding import batch_shards, initialize_distributed, make_mesh, tracing_context
from sdxl_jax.train import checkpoint
from sdxl_jax.train.config import check
from sdxl_jax.train.data import bucket, global_batch, make_data
from sdxl_jax.train.export import export_run
from sdxl_jax.train.metrics import MetricsWriter
from sdxl_jax.train.state import TrainState, create_sharded_state
from sdxl_jax.train.step import CompiledSteps, StepSpec
from sdxl_jax.train.validation import make_validation


def train(config: ml_collections.ConfigDict, workdir) -> TrainState:
    """Run (or resume) the training described by `config` in `workdir` (a local path or a bucket URL,
    see `storage`); returns the final state."""
    check(config)
    initialize_distributed(config.distributed)
    # every host checks it can write there, before any compute (a typo would otherwise surface at the
    # first checkpoint)
    workdir = storage.check_writable(workdir, "--workdir")
    storage.orbax_path(workdir / "checkpoints", "--workdir")  # and Orbax can keep checkpoints there
    mesh = make_mesh(config.mesh)
    if config.batch_size % batch_shards(mesh, config.sharding_rules):
        raise ValueError(f"batch_size {config.batch_size} does not split over the mesh {dict(mesh.shape)}")
    spec = StepSpec.build(config, mesh)
    state, frozen = create_sharded_state(spec)
    data = make_data(config)
    manager = checkpoint.make_manager(workdir / "checkpoints", config)
    restored, restored_step = checkpoint.restore_latest(manager, state, data)
    state = restored if restored is not None else state

    writer = MetricsWriter(workdir, config, enabled=jax.process_index() == 0)
    writer.message(
        f"{'resumed at step ' + str(restored_step) if restored is not None else 'new run'}; "
        f"mesh {dict(mesh.shape)}, {jax.process_count()} process(es), seed {config.seed}"
    )
    step_fn = CompiledSteps(spec, lambda: tracing_context(config, mesh))
    validate = make_validation(spec) if config.validation.every else None

    saved = restored_step
    with checkpoint.PreemptionWatch() as preemption:
        for step in range(int(state.step) + 1, config.num_steps + 1):
            start = time.perf_counter()
            local = next(data)
            state, metrics = step_fn(state, frozen, global_batch(local, spec.batch_sharding))
            metrics = jax.device_get(metrics)  # waits for the step
            seconds = time.perf_counter() - start
            writer.step(step, metrics, bucket(local), seconds, step_fn.last_flops, timed=not step_fn.last_compiled)
            if int(metrics["skipped"]) >= config.max_consecutive_skips:
                raise FloatingPointError(
                    f"step {step}: {int(metrics['skipped'])} consecutive non-finite losses or "
                    f"gradients (max_consecutive_skips={config.max_consecutive_skips}); stopping"
                )
            if validate is not None and step % config.validation.every == 0:
                images, scalars = validate(frozen, state.ema_params)
                writer.images(step, "validation", images)
                writer.scalars(step, "validation", scalars)
            if step % config.checkpoint_every == 0:
                checkpoint.save(manager, step, state, data)
                saved = step
            if preemption.requested():
                writer.message(f"step {step}: SIGTERM, saving and stopping")
                break

    if saved != int(state.step):
        checkpoint.save(manager, int(state.step), state, data)
    manager.wait_until_finished()
    manager.close()
    data.close()
    if int(state.step) == config.num_steps:
        export_run(spec, state, frozen, workdir)
    writer.close()
    return state
