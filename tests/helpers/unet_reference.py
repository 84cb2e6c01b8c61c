"""The PyTorch side of the UNet parity tests: tiny diffusers UNet configs (SDXL base, refiner, SD 1.5
shapes), the perturbed reference model, its inputs and forward pass."""

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from tests.helpers.torch_reference import from_nchw, perturb_, to_nchw

TIME_ID_DIM = 8  # addition_time_embed_dim of the tiny text_time configs


def text_time(n_ids: int, **blocks) -> dict:
    """An SDXL-style config: linear projections, y = pooled text (16) + `n_ids` embedded time ids."""
    return dict(
        blocks,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_ID_DIM,
        projection_class_embeddings_input_dim=16 + n_ids * TIME_ID_DIM,
    )


SDXL_TINY = text_time(
    6,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128),
    transformer_layers_per_block=(1, 2, 3),  # level 0 has no attention; the middle block gets 3
    attention_head_dim=(2, 4, 8),  # heads per level (diffusers' naming): head width 16
    cross_attention_dim=48,
)
REFINER_TINY = text_time(
    5,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128, 128),
    transformer_layers_per_block=2,
    attention_head_dim=(2, 4, 8, 8),
    cross_attention_dim=40,
)
SD15_TINY = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 96, 96),
    attention_head_dim=4,  # 4 heads everywhere: head widths 8/16/24
    cross_attention_dim=32,
    use_linear_projection=False,  # 1x1 conv proj_in/proj_out
)


def make_reference(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8, **config)
    return perturb_(model, seed)


def random_inputs(model: UNet2DConditionModel, batch: int, height: int, width: int, seed: int = 0):
    """Inputs for both models: (x NHWC, t, context, text_embeds, time_ids or None)."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    x = rng.standard_normal((batch, height, width, 4)).astype(np.float32)
    t = rng.uniform(0, 999, batch).astype(np.float32)
    ctx = rng.standard_normal((batch, 7, cfg.cross_attention_dim)).astype(np.float32)
    if cfg.addition_embed_type is None:
        return x, t, ctx, None, None
    n_ids = (cfg.projection_class_embeddings_input_dim - 16) // TIME_ID_DIM
    text = rng.standard_normal((batch, 16)).astype(np.float32)
    ids = rng.uniform(0, 1024, (batch, n_ids)).round().astype(np.float32)
    return x, t, ctx, text, ids


def reference_forward(model, x, t, ctx, text, ids) -> np.ndarray:
    kwargs = {}
    if text is not None:
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.from_numpy(text), time_ids=torch.from_numpy(ids))
    with torch.no_grad():
        out = model(to_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample
    return from_nchw(out)
