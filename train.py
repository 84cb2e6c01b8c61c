"""Training entry point (placeholder until the training issue): prints the plan and exits.

    python train.py
"""

print("sdxl_jax train.py: the trainer (mesh -> sharded state -> grain data -> jitted step -> Orbax "
      "checkpoints) is not built yet; see the README's status table.")
