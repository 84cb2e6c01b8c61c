"""`python -m sdxl_jax.plan ...`: the memory planner, kept at its old name (`sdxl_jax.train.memory_plan`)."""

from absl import app

from sdxl_jax.train.memory_plan import main

if __name__ == "__main__":
    app.run(main)
