"""A frozen UNet's encoder as the feature network of the projected discriminator (latent adversarial
distillation: the teacher's own hidden states on re-noised latents feed the heads instead of DINOv2's).

`UNet.encode_features` returns the encoder's maps by name (`unet.feature_names`), `[B, h, w, C]`:
"down_blocks_{i}" (level i, before its downsampler) and "mid_block". The discriminator takes a list of
token arrays `[B, N_k, C_k]`, one per head; here a map becomes `[B, h * w, C]` (row-major: token n is
pixel (n // w, n % w), so the heads' circular 1-D convolution runs along rows and wraps from one row's
end into the next), and the names chosen, in their order, are the heads:

    names = ("down_blocks_1", "down_blocks_2", "mid_block")  # from the run's config
    disc_cfg = ProjectedDiscriminatorConfig(feature_channels=feature_channels(unet_cfg, names), ...)
    tokens = unet_feature_tokens(unet_cfg, teacher_params, x_t, t, context, y, names)
    logits = ProjectedDiscriminator(disc_cfg).apply(variables, tokens, text_embed, train=True, ...)

Nothing here stops gradients: the generator's loss differentiates through the teacher's features with
respect to the latent (the teacher's parameters are frozen by not being differentiated).
"""

from collections.abc import Mapping, Sequence

import jax

from sdxl_jax.models.unet import UNet, UNetConfig, check_latent_size, feature_names


def _level(cfg: UNetConfig, name: str) -> int:
    """The level (resolution index) of a feature; a name that is not a feature of `cfg` is an error."""
    names = feature_names(cfg)
    if name not in names:
        raise ValueError(f"{name!r} is not a UNet encoder feature; choose from {names}")
    return len(cfg.channel_mult) - 1 if name == names[-1] else names.index(name)  # the middle block: last level


def _check_some(names: Sequence[str]) -> None:
    if isinstance(names, str) or not names:
        raise ValueError(f"name at least one UNet encoder feature (a sequence of names), got {names!r}")


def check_feature_names(cfg: UNetConfig, names: Sequence[str]) -> None:
    """At least one name, each a feature of `cfg`, none twice."""
    _check_some(names)
    if len(set(names)) != len(names):
        raise ValueError(f"UNet feature names repeat: {tuple(names)}")
    for name in names:
        _level(cfg, name)


def feature_channels(cfg: UNetConfig, names: Sequence[str]) -> tuple[int, ...]:
    """The channels of the named features, in order: `ProjectedDiscriminatorConfig.feature_channels`."""
    check_feature_names(cfg, names)
    return tuple(cfg.level_channels[_level(cfg, name)] for name in names)


def feature_token_counts(cfg: UNetConfig, names: Sequence[str], height: int, width: int) -> tuple[int, ...]:
    """Tokens per head (h * w of each named map) for a latent of `height` x `width`."""
    check_feature_names(cfg, names)
    check_latent_size(cfg, height, width)
    return tuple((height >> _level(cfg, n)) * (width >> _level(cfg, n)) for n in names)


def feature_tokens(features: Mapping[str, jax.Array], names: Sequence[str]) -> list[jax.Array]:
    """The named maps `[B, h, w, C]` of `UNet.encode_features`, in `names`' order, as tokens `[B, h * w, C]`."""
    _check_some(names)
    missing = [n for n in names if n not in features]
    if missing:
        raise ValueError(f"features {missing} not among the UNet's {tuple(features)}")
    tokens = []
    for name in names:
        b, h, w, c = features[name].shape
        tokens.append(features[name].reshape(b, h * w, c))
    return tokens


def unet_feature_tokens(cfg: UNetConfig, params, x, timesteps, context, y, names: Sequence[str]) -> list[jax.Array]:
    """The discriminator's inputs from a UNet's encoder: `x` `[B, H, W, in_channels]` (the re-noised
    latent), `timesteps` `[B]`, `context`, `y` as for `UNet.__call__`; `params` the UNet's (unboxed)."""
    check_feature_names(cfg, names)
    features = UNet(cfg).apply({"params": params}, x, timesteps, context, y, method="encode_features")
    return feature_tokens(features, names)
