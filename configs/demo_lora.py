"""The demo LoRA: teach the shipped demo model a colour it never saw (pink), on a CPU, in minutes.

    python train.py --config configs/demo_lora.py --workdir runs/demo_lora   # writes runs/demo_lora_shapes/ first
    python sample.py --config configs/demo.py --lora runs/demo_lora/export/lora.safetensors \
        --prompt "a pink triangle on a blue background"

Starts from the checkpoint shipped in `sdxl_jax/assets/demo` (frozen) and trains rank-8 adapters on the
UNet's transformers and both text encoders (`train/lora.py`) on the demo's shapes drawn in pink (a third
of the images) and in the six colours the model knows (so their prompts keep working), with the demo's
objective, in one square 32² bucket (the size the demo samples at; one compiled step, not three).
Exports a kohya-format LoRA file. What it learns, how fast, and why not a new shape (a diamond did not
come in this time, not even with every weight trained): README, "LoRA".
"""

from configs import demo
from sdxl_jax.data import shapes


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/demo_lora.py takes no argument, got {arg!r}")
    c = demo.get_config()
    c.init_from = str(demo.SHIPPED)
    c.train_text_encoders = False  # frozen; adapters instead
    c.lora.update(rank=8, alpha=8.0, targets="transformer", text_encoders="text_encoder,text_encoder_2")
    pink = ("pink",) * 3  # a third of the triples
    c.data.update(
        path="runs/demo_lora_shapes", foregrounds=",".join(pink + shapes.FOREGROUNDS), num_images=2000,
        buckets="area=32,step=8,ratio=1.0",
    )  # fmt: skip
    c.update(num_steps=300, checkpoint_every=150, log_every=50)
    c.optimizer.update(
        name="adamw", learning_rate=3e-3, text_encoder_learning_rate=3e-3, schedule="cosine", warmup_steps=20,
        decay_steps=300, end_factor=0.1, weight_decay=0.0,
    )  # fmt: skip
    c.ema.decay = 0.99
    c.validation.update(
        every=300, prompts=("a pink triangle on a blue background", "a red circle on a white background")
    )
    c.export_on_finish = "lora"
    return c
