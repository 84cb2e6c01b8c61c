"""The demo, distilled: adversarial diffusion distillation (ADD) of the shipped demo model into a student
that samples in 1 to 4 steps, on a CPU, in minutes.

    python train.py --config configs/demo_add.py --workdir runs/demo_add      # reuses runs/demo_shapes/
    python sample.py --config configs/demo.py --config.sample.checkpoint=runs/demo_add/export/sdxl_jax \
        --steps 4 --sampler euler_a --guidance 0 --prompt "a red circle on a blue background"

Student and teacher both start as the checkpoint shipped in `sdxl_jax/assets/demo`; the teacher stays
frozen and its own encoder is the discriminator's feature network (`distillation.features = "teacher"`:
no extra weights). The student learns the teacher's CFG-4 x0 estimate from one re-noised step (the
distillation term, in pixel space: the demo model works on pixels) and the heads' hinge loss (at
weight 0.05, see below) on its 4 timesteps (249, 499, 749, 999, the trailing sampler's), pure noise at
the last. Data: the demo's
shapes in one square 32² bucket. Argument: "" (ADD) or `distill_only` (adversarial term off: the
ablation the README shows). What it reaches: README, "Distilling the demo".
"""

from configs import demo


def get_config(arg=None):
    if arg not in (None, "", "distill_only"):
        raise ValueError(f"configs/demo_add.py takes no argument or 'distill_only', got {arg!r}")
    c = demo.get_config()
    c.objective = "add"
    c.init_from = str(demo.SHIPPED)
    c.train_text_encoders = False
    c.data.update(buckets="area=32,step=8,ratio=1.0", caption_dropout=0.0)
    c.update(num_steps=300, checkpoint_every=150, log_every=50)
    c.optimizer.update(
        name="adamw", learning_rate=3e-4, schedule="cosine", warmup_steps=20, decay_steps=300, end_factor=0.1,
        weight_decay=0.0,
    )  # fmt: skip
    c.ema.decay = 0.99
    # the hinge term's gradients are ~20x the mean-squared pixel distance's here: at weight 1 they drowned
    # it and the shapes melted into blobs (README, "Distilling the demo"); 0.05 puts the two at one scale
    c.distillation.update(guidance_min=4.0, guidance_max=4.0, adversarial_weight=0.05)
    c.distillation.discriminator_optimizer.update(learning_rate=3e-4)
    if arg == "distill_only":
        c.distillation.adversarial_weight = 0.0
    c.validation.update(every=300, steps=4, sampler="euler_a", schedule="trailing", guidance_scale=0.0)
    c.export_on_finish = "project"
    return c
