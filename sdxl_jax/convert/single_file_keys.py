"""Tensor names of the original (sgm / "ldm") single-file SDXL checkpoint and their diffusers names.

A single file holds every component under one prefix each: `model.diffusion_model.` (UNet),
`first_stage_model.` (VAE), `conditioner.embedders.0.transformer.` (base only: CLIP-L, with
transformers' own `text_model.*` names) and `conditioner.embedders.{1 base, 0 refiner}.model.`
(OpenCLIP bigG, open_clip's names).

Per component, a *name table* maps a diffusers module path, or one full diffusers key, to its name
in the single file, with the op that turns the one tensor into the other (`single_file_name` looks a
key up by its longest matching prefix, so a module entry renames every tensor under it). The tables
are built from the model configs, so the block numbering follows any number of levels.
"""

from collections import Counter
from collections.abc import Iterable

from sdxl_jax.convert.mapping import ConversionError
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIXES = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
SIGMAS = "denoiser.sigmas"  # the sgm denoiser's sigma table: a buffer, derived from the schedule
POSITION_IDS = "text_model.embeddings.position_ids"  # transformers < 4.31 saved this buffer

# A table entry: (single-file module path or key, op kind, part). The kind is a key of
# `single_file.OP_KINDS`; a kind other than "copy" belongs to a full-key entry (one tensor). `part`
# is the index of this diffusers tensor among those that one single-file tensor is split into.
Entry = tuple[str, str, int]
NameTable = dict[str, Entry]

# diffusers ResnetBlock2D sub-module -> sgm ResBlock sub-module.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers VAE mid-block attention -> sgm AttnBlock; the projections are 1x1 convs in sgm.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# diffusers CLIPEncoderLayer sub-module -> open_clip ResidualAttentionBlock sub-module.
_BIGG_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def component_prefixes(model: str) -> dict[str, str]:
    """Component -> its prefix in a single file of `model` ("base" or "refiner")."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
    if model == "base":
        prefixes["text_encoder"] = CLIP_L_PREFIX
    return prefixes | {"text_encoder_2": BIGG_PREFIXES[model]}


def ignorable_keys(model: str) -> frozenset[str]:
    """Single-file tensors that no diffusers parameter corresponds to: buffers and the unused logit_scale."""
    keys = {SIGMAS, BIGG_PREFIXES[model] + "logit_scale"}
    if model == "base":
        keys.add(CLIP_L_PREFIX + POSITION_IDS)
    return frozenset(keys)


def _key_group(key: str) -> str:
    """The part of a key that names a component: `conditioner.embedders.1.model`, `first_stage_model`, ..."""
    parts = key.split(".")
    return ".".join(parts[: {"conditioner": 4, "cond_stage_model": 2, "model": 2}.get(parts[0], 1)])


def detect_model(keys: Iterable[str]) -> str:
    """The model kind, "base" or "refiner", from which embedders hold the text encoders; raises for others."""
    groups = Counter(_key_group(k) for k in keys)
    text = {g for g in groups if g.startswith(("conditioner", "cond_stage_model"))}
    if text == {CLIP_L_PREFIX[:-1], BIGG_PREFIXES["base"][:-1]}:
        return "base"
    if text == {BIGG_PREFIXES["refiner"][:-1]}:
        return "refiner"
    if "cond_stage_model.transformer" in groups:
        what = "this looks like an SD 1.x checkpoint (CLIP-L under cond_stage_model.transformer.)"
    elif "cond_stage_model.model" in groups:
        what = "this looks like an SD 2.x checkpoint (OpenCLIP-H under cond_stage_model.model.)"
    else:
        what = "this is not an SDXL single file"
    found = ", ".join(f"{g} ({n} tensors)" for g, n in sorted(groups.items()))
    raise ConversionError(
        f"{what}; only SDXL base/refiner single files are supported (base: text encoders under "
        f"{CLIP_L_PREFIX!r} and {BIGG_PREFIXES['base']!r}; refiner: under {BIGG_PREFIXES['refiner']!r}). "
        f"Found: {found or 'no tensors'}"
    )


def single_file_name(table: NameTable, key: str) -> tuple[str, str, int]:
    """(single-file name, op kind, part) of one diffusers key (without the component prefix)."""
    parts = key.split(".")
    for n in range(len(parts), -1, -1):
        entry = table.get(".".join(parts[:n]))
        if entry is not None:
            name, kind, part = entry
            return ".".join(p for p in (name, *parts[n:]) if p), kind, part
    raise ConversionError(f"no single-file name for diffusers key {key!r}")


def unet_names(cfg: UNetConfig) -> NameTable:
    """The UNet's table. sgm numbers its blocks flat: `input_blocks.0` is conv_in, then per level
    `num_res_blocks` x [resnet, transformer?] and (all but the last level) one downsampler block;
    `output_blocks` hold `num_res_blocks + 1` x [resnet, transformer?, upsampler?] per level, deepest
    first, the upsampler being the block's last layer (index 2 after a transformer, else 1)."""
    table: NameTable = {}

    def module(diffusers: str, sgm: str) -> None:
        table[diffusers] = (sgm, "copy", 0)

    def resnet(diffusers: str, sgm: str) -> None:
        for d, s in _UNET_RESNET.items():
            module(f"{diffusers}.{d}", f"{sgm}.{s}")

    module("time_embedding.linear_1", "time_embed.0")
    module("time_embedding.linear_2", "time_embed.2")
    if cfg.adm_in_channels is not None:
        module("add_embedding.linear_1", "label_emb.0.0")
        module("add_embedding.linear_2", "label_emb.0.2")
    module("conv_in", "input_blocks.0.0")
    levels, n = len(cfg.channel_mult), cfg.num_res_blocks
    for level in range(levels):
        first = 1 + level * (n + 1)
        for j in range(n):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{first + j}.0")
            if cfg.transformer_depth[level]:
                module(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{first + j}.1")
        if level < levels - 1:
            module(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{first + n}.0.op")
    resnet("mid_block.resnets.0", "middle_block.0")
    module("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")
    for up in range(levels):
        has_attention, first = cfg.transformer_depth[levels - 1 - up] > 0, up * (n + 1)
        for j in range(n + 1):
            resnet(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{first + j}.0")
            if has_attention:
                module(f"up_blocks.{up}.attentions.{j}", f"output_blocks.{first + j}.1")
        if up < levels - 1:
            module(f"up_blocks.{up}.upsamplers.0.conv", f"output_blocks.{first + n}.{2 if has_attention else 1}.conv")
    module("conv_norm_out", "out.0")
    module("conv_out", "out.2")
    return table


def vae_names(cfg: VAEConfig) -> NameTable:
    """The VAE's table: sgm numbers the decoder's levels from full resolution (`up.0`), diffusers from
    the deepest (`up_blocks.0`); the mid attention's q/k/v/proj_out are 1x1 convs in sgm."""
    table: NameTable = {}
    levels = len(cfg.block_out_channels)

    def resnet(diffusers: str, sgm: str) -> None:
        table[diffusers] = (sgm, "copy", 0)
        table[f"{diffusers}.conv_shortcut"] = (f"{sgm}.nin_shortcut", "copy", 0)

    for side in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            table[f"{side}.{name}"] = (f"{side}.{name}", "copy", 0)
        table[f"{side}.conv_norm_out"] = (f"{side}.norm_out", "copy", 0)
        for j in range(2):
            resnet(f"{side}.mid_block.resnets.{j}", f"{side}.mid.block_{j + 1}")
        for d, s in _VAE_ATTENTION.items():
            table[f"{side}.mid_block.attentions.0.{d}"] = (f"{side}.mid.attn_1.{s}", "copy", 0)
            if d != "group_norm":
                table[f"{side}.mid_block.attentions.0.{d}.weight"] = (f"{side}.mid.attn_1.{s}.weight", "squeeze", 0)
    for level in range(levels):
        for j in range(cfg.layers_per_block):
            resnet(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}")
        if level < levels - 1:
            downsampler = (f"encoder.down.{level}.downsample.conv", "copy", 0)
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = downsampler
    for up in range(levels):
        level = levels - 1 - up
        for j in range(cfg.layers_per_block + 1):
            resnet(f"decoder.up_blocks.{up}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        if level > 0:
            table[f"decoder.up_blocks.{up}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", "copy", 0)
    for name in ("quant_conv", "post_quant_conv"):
        table[name] = (name, "copy", 0)
    return table


def clip_l_names() -> NameTable:
    """CLIP-L keeps transformers' names (`text_model.*`) in the single file."""
    return {"": ("", "copy", 0)}


def bigg_names(num_layers: int) -> NameTable:
    """OpenCLIP bigG: open_clip's names; the attention's q, k, v are one stacked `in_proj` (rows in that
    order), and `text_projection` is applied as `x @ P`, the transpose of transformers' Linear weight."""
    table: NameTable = {
        "text_model.embeddings.token_embedding": ("token_embedding", "copy", 0),
        "text_model.embeddings.position_embedding.weight": ("positional_embedding", "copy", 0),
        "text_model.final_layer_norm": ("ln_final", "copy", 0),
        "text_projection.weight": ("text_projection", "transpose", 0),
    }
    for i in range(num_layers):
        layer, block = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for d, s in _BIGG_LAYER.items():
            table[f"{layer}.{d}"] = (f"{block}.{s}", "copy", 0)
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            for leaf in ("weight", "bias"):
                table[f"{layer}.self_attn.{proj}.{leaf}"] = (f"{block}.attn.in_proj_{leaf}", "split", part)
    return table
