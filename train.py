"""Train SDXL (base or refiner, UNet and optionally the text encoders) on a mesh of any size.

    python train.py --config configs/tiny.py --workdir /tmp/tiny
    python train.py --config configs/sdxl_finetune_1024.py --workdir gs://bucket/run \
        --config.init_from=/weights/sdxl-base --config.mesh.fsdp=8 --config.num_steps=10000

The life of a run, top to bottom: processes joined -> mesh -> sharded state (or the newest complete
checkpoint) -> data -> the loop (step, log, validate, checkpoint; SIGTERM saves and stops) -> final
checkpoint -> export. Outputs in WORKDIR: checkpoints/, metrics.jsonl, tensorboard/, validation/,
export/ (with --config.export_on_finish).
"""

import time
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sdxl_jax import checkpoint, train_config
from sdxl_jax.feed import bucket, global_batch, make_data
from sdxl_jax.huge_pages import reexec_with_huge_pages
from sdxl_jax.mesh import batch_shards, batch_sharding, initialize_distributed, make_mesh, tracing_context
from sdxl_jax.metrics import MetricsWriter
from sdxl_jax.train_export import export_run
from sdxl_jax.train_state import create_sharded_state, make_optimizer, models_from_config, trainable_components
from sdxl_jax.train_step import compiled_steps
from sdxl_jax.validation import make_validation


def train(config, workdir: str | Path):
    """Run (or resume) the training described by `config` in `workdir`; returns the final state."""
    train_config.check(config)
    initialize_distributed(config.distributed)
    mesh = make_mesh(config.mesh)
    if config.batch_size % batch_shards(mesh, config.sharding_rules):
        raise ValueError(f"batch_size {config.batch_size} does not split over the mesh {dict(mesh.shape)}")
    models = models_from_config(config.model)
    tx, lr_schedule = make_optimizer(config.optimizer, trainable_components(config, models))
    state, frozen, shardings = create_sharded_state(config, models, tx, mesh)
    data = make_data(config)
    manager = checkpoint.make_manager(Path(workdir) / "checkpoints", config)
    restored, restored_step = checkpoint.restore_latest(manager, state, data)
    state = restored if restored is not None else state

    writer = MetricsWriter(workdir, config, enabled=jax.process_index() == 0)
    writer.message(f"{'resumed at step ' + str(restored_step) if restored is not None else 'new run'}; "
                   f"mesh {dict(mesh.shape)}, {jax.process_count()} process(es), seed {config.seed}")
    batch_sh = batch_sharding(mesh, config.sharding_rules)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    step_fn = compiled_steps(models, tx, lr_schedule, config, shardings, frozen_sh, batch_sh,
                             lambda: tracing_context(config, mesh))
    validate = make_validation(models, config, mesh) if config.validation.every else None

    saved = restored_step
    with checkpoint.PreemptionWatch() as preemption:
        for step in range(int(state.step) + 1, config.num_steps + 1):
            start = time.perf_counter()
            local = next(data)
            state, metrics = step_fn(state, frozen, global_batch(local, batch_sh))
            metrics = jax.device_get(metrics)  # waits for the step
            seconds = time.perf_counter() - start
            writer.step(step, metrics, bucket(local), seconds, step_fn.last_flops, timed=not step_fn.last_compiled)
            if int(metrics["skipped"]) >= config.max_consecutive_skips:
                raise FloatingPointError(f"step {step}: {int(metrics['skipped'])} consecutive non-finite losses or "
                                         f"gradients (max_consecutive_skips={config.max_consecutive_skips}); stopping")
            if validate is not None and step % config.validation.every == 0:
                writer.images(step, "validation", validate(frozen | state.ema_params))
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
        export_run(models, state, frozen, config, workdir)
    writer.close()
    return state


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally with :argument", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and exports go (a run resumes from it)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config.malloc_huge_pages:
        reexec_with_huge_pages()  # replaces this process, so before any work
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
