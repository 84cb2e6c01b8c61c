"""LoRA adapters: which kernels get one, how they start, and the weights the model runs with.

An adapter on a kernel W (Flax layout: Dense [in, out], Conv [kh, kw, in, out]) is

    down  W.shape[:-1] + (r,)   kaiming-uniform, U(+-1/sqrt(fan_in)), fan_in = prod(W.shape[:-1]), as
                                kohya and PEFT initialise theirs (a conv adapter's down is a conv with
                                W's kernel size, so a 3x3 kernel gets a 3x3 down)
    up    (r, out)              zeros: training starts exactly at the base model

and the model runs with  W + scale * alpha / r * einsum("...r,ro->...o", down, up)  (`merged`), built
inside the compiled step from the frozen base and the trained adapters, so no model code changes and
the optimiser, EMA and checkpoints hold only the adapters. The same kernel in PyTorch layout is
kohya's `up @ down` (`convert.lora.save_lora` writes them).

Targets (`LoraSpec.targets`), by the diffusers module names of the UNet and the text encoders:
    attention    to_q, to_k, to_v, to_out.0 (UNet); q/k/v/out_proj (text)
    transformer  kohya's default: every Linear of each transformer block and its proj_in / proj_out;
                 every Linear of each text-encoder layer (attention and MLP)
    conv         transformer + the resnets' conv1, conv2, time_emb_proj, conv_shortcut and the down /
                 upsamplers' convs (LoCon), 3x3 kernels with `conv_rank` / `conv_alpha`
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

UNET_TARGETS = {
    "attention": (".to_q", ".to_k", ".to_v", ".to_out.0"),
    "transformer": (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".ff.net.0.proj", ".ff.net.2"),
}
UNET_TARGETS["conv"] = UNET_TARGETS["transformer"] + (
    ".conv1", ".conv2", ".time_emb_proj", ".conv_shortcut", "samplers.0.conv",
)  # fmt: skip
TEXT_TARGETS = {
    "attention": (".q_proj", ".k_proj", ".v_proj", ".out_proj"),
    "transformer": (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2"),
}
TEXT_TARGETS["conv"] = TEXT_TARGETS["transformer"]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank / alpha of the adapters (alpha / rank scales them), conv_rank / conv_alpha those of 3x3
    kernels under `conv` targets (0: conv_rank = rank), and which kernels get one."""

    rank: int = 32
    alpha: float = 16.0
    targets: str = "transformer"
    conv_rank: int = 0
    conv_alpha: float = 1.0

    def __post_init__(self):
        if self.targets not in UNET_TARGETS:
            raise ValueError(f"lora targets {self.targets!r} is not one of {sorted(UNET_TARGETS)}")
        if self.rank < 1 or self.conv_rank < 0:
            raise ValueError(f"lora rank must be >= 1 and conv_rank >= 0, got {self.rank}, {self.conv_rank}")
        if not (self.alpha > 0 and self.conv_alpha > 0):  # files read alpha 0 as alpha = rank
            raise ValueError(f"lora alpha and conv_alpha must be > 0, got {self.alpha}, {self.conv_alpha}")

    def rank_alpha(self, kernel_shape) -> tuple[int, float]:
        """(r, alpha) of the adapter on a kernel of this (Flax) shape."""
        spatial = len(kernel_shape) == 4 and kernel_shape[0] * kernel_shape[1] > 1
        if spatial and self.conv_rank:
            return self.conv_rank, self.conv_alpha
        return self.rank, self.alpha

    def targets_module(self, component: str, torch_module: str) -> bool:
        """Whether the module (a diffusers name, e.g. `down_blocks.1.attentions.0.proj_in`) gets an adapter."""
        suffixes = (UNET_TARGETS if component == "unet" else TEXT_TARGETS)[self.targets]
        return torch_module.endswith(suffixes)


def init_adapters(key: jax.Array, kernels: dict[str, jax.ShapeDtypeStruct], spec: LoraSpec, dtype=jnp.float32):
    """`{name: {"down", "up"}}` for the named kernels (shapes only are read): down kaiming-uniform, up 0."""
    out = {}
    for k, (name, kernel) in zip(jax.random.split(key, max(len(kernels), 1)), sorted(kernels.items())):
        rank, _ = spec.rank_alpha(kernel.shape)
        bound = 1 / math.sqrt(math.prod(kernel.shape[:-1]))
        down = jax.random.uniform(k, (*kernel.shape[:-1], rank), dtype, -bound, bound)
        out[name] = {"down": down, "up": jnp.zeros((rank, kernel.shape[-1]), dtype)}
    return out


def delta(adapter: dict, spec: LoraSpec, scale: float = 1.0) -> jax.Array:
    """scale * alpha / r * down @ up, in the kernel's (Flax) shape, fp32."""
    rank, alpha = spec.rank_alpha((*adapter["down"].shape[:-1], adapter["up"].shape[-1]))
    down, up = adapter["down"].astype(jnp.float32), adapter["up"].astype(jnp.float32)
    return (scale * alpha / rank) * jnp.einsum("...r,ro->...o", down, up)


def merged(kernels: dict[str, jax.Array], adapters: dict, spec: LoraSpec, scale: float = 1.0) -> dict:
    """The named kernels with their adapters added (in fp32, then back to each kernel's dtype)."""
    return {
        name: (w.astype(jnp.float32) + delta(adapters[name], spec, scale)).astype(w.dtype) if name in adapters else w
        for name, w in kernels.items()
    }
