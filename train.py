"""Train SDXL (base or refiner, UNet and optionally the text encoders) on a mesh of any size.

    python train.py --config configs/tiny.py --workdir /tmp/tiny
    python train.py --config configs/sdxl_finetune_1024.py --workdir gs://bucket/run \
        --config.init_from=/weights/sdxl-base --config.mesh.fsdp=8 --config.num_steps=10000

The run itself is `sdxl_jax.train.loop.train(config, workdir)`; this script parses the flags. Outputs in
WORKDIR: checkpoints/, metrics.jsonl, config.json, tensorboard/, validation/, export/ (with
--config.export_on_finish). Started again on the same WORKDIR, a run resumes from its newest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sdxl_jax import storage
from sdxl_jax.train.huge_pages import reexec_with_huge_pages
from sdxl_jax.train.loop import train

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
    try:
        train(FLAGS.config, FLAGS.workdir)
    except storage.StorageError as e:  # a bad --workdir: one line, before any compute
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    app.run(main)
