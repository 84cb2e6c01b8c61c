"""A whole SDXL pipeline's weights (per component: config + params), and this project's own format.

    PipelineWeights.components = {"unet": (UNetConfig, params), "vae": (VAEConfig, params),
                                  "text_encoder": (CLIPTextConfig, params),      # CLIP-L, base only
                                  "text_encoder_2": (CLIPTextConfig, params)}    # bigG

The project format is a folder: `sdxl_jax.json` (model type, every component's config, metadata) and
one Orbax checkpoint per component (`unet/`, `vae/`, ...). It is written to a temporary sibling and
renamed into place, so a failed or interrupted save never leaves something that looks valid.
"""

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import storage
from sdxl_jax.convert.components import COMPONENTS, load_component
from sdxl_jax.convert.files import Prefetch, atomic_output, whole_files
from sdxl_jax.convert.mapping import ConversionError, LeafPlacer, check_tree, shape_of
from sdxl_jax.models import pixel_space
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig

FORMAT_NAME = "sdxl_jax"
FORMAT_VERSION = 1
INDEX_FILE = "sdxl_jax.json"
CONFIG_TYPES = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig, "text_encoder_2": CLIPTextConfig}
MODEL_COMPONENTS = {
    "base": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "refiner": ("unet", "vae", "text_encoder_2"),
}
ABSTRACT_PARAMS = {name: component.abstract_params for name, component in COMPONENTS.items()}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass
class PipelineWeights:
    """model: "base" | "refiner"; components: name -> (config, params as a numpy/jax tree); metadata: str -> str."""

    model: str
    components: dict[str, tuple[Any, Any]]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.model not in MODEL_COMPONENTS:
            raise ValueError(f"model must be one of {sorted(MODEL_COMPONENTS)}, got {self.model!r}")
        want, have = set(MODEL_COMPONENTS[self.model]), set(self.components)
        if want != have:
            raise ValueError(f"an SDXL {self.model} has components {sorted(want)}, got {sorted(have)}")

    def config(self, name: str):
        return self.components[name][0]

    def params(self, name: str):
        return self.components[name][1]

    def num_parameters(self) -> int:
        return sum(int(np.prod(x.shape)) for _, p in self.components.values() for x in jax.tree_util.tree_leaves(p))

    def num_bytes(self) -> int:
        return sum(x.nbytes for _, p in self.components.values() for x in jax.tree_util.tree_leaves(p))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a loader puts each parameter as it reads it, so no whole model is ever built on the host:
    `shardings(component, cfg)` gives the tree of `jax.sharding.Sharding`s of that component's params
    (the tree of `cfg`), `dtypes` the dtype to cast each component to (others: the config's
    `param_dtype`). Each tensor is read, laid out, cast and put on the devices before the next is read.
    """

    shardings: Callable[[str, Any], Any]  # may return None: that component is read into numpy instead
    dtypes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def dtype(self, name: str, cfg) -> np.dtype:
        return np.dtype(jnp.dtype(self.dtypes.get(name, cfg.param_dtype)))

    def placer(self, name: str, cfg) -> LeafPlacer | None:
        """(Flax path, PyTorch tensor, its torch -> Flax layout function) -> the leaf on the devices: the
        tensor is put there as read and laid out and cast by XLA (numpy's strided transposes of conv
        kernels and its fp16 -> bf16 cast were most of a full-size load's time). None: not placed."""
        shardings = self.shardings(name, cfg)
        if shardings is None:
            return None
        flat = flax.traverse_util.flatten_dict(shardings)
        dtype = self.dtype(name, cfg)

        def place(path, tensor, to_flax):
            sharding = flat[path]
            named = isinstance(sharding, jax.sharding.NamedSharding)  # the source whole on every device
            whole = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()) if named else sharding
            source = jax.make_array_from_callback(tensor.shape, whole, lambda index: tensor[index])
            out = _layout_and_cast(to_flax, dtype, sharding)(source)
            return out.block_until_ready()  # the host tensor (and the source copy) are free once this returns

        return place

    def abstract(self, name: str, cfg):
        """The component's params as `ShapeDtypeStruct`s with this placement's dtype and shardings (what
        Orbax restores into); None where the component is not placed."""
        shardings = self.shardings(name, cfg)
        if shardings is None:
            return None
        abstract = nn.meta.unbox(ABSTRACT_PARAMS[name](cfg))
        dtype = self.dtype(name, cfg)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), abstract, shardings)


@functools.lru_cache(maxsize=64)
def _layout_and_cast(to_flax, dtype, sharding):
    return jax.jit(lambda x: to_flax(x).astype(dtype), out_shardings=sharding)


def param_dtype_overrides(dtype: str | None) -> dict:
    """`--dtype fp32|bf16|fp16` (or None: keep the source's) as config overrides for the loaders."""
    if dtype is None:
        return {}
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dict(param_dtype=DTYPES[dtype])


def check_params(name: str, cfg, params) -> None:
    """Raise ConversionError naming every parameter whose presence or shape disagrees with `cfg`."""
    check_tree(f"{name} params do not match its config", params, ABSTRACT_PARAMS[name](cfg))


# ---- configs <-> JSON --------------------------------------------------------------------------------


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(name: str, fields: dict):
    """The component's config dataclass from its JSON dict (lists back to tuples); unknown fields are errors."""
    cls = pixel_space.first_stage_config_type(fields) if name == "vae" else CONFIG_TYPES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(fields) - known:
        raise ValueError(f"{name} config has fields {cls.__name__} does not know: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


# ---- the project format ------------------------------------------------------------------------------


def save_project(weights: PipelineWeights, path: str | Path) -> Path:
    """Write `weights` as the project format at `path` (must not exist), atomically."""
    import orbax.checkpoint as ocp

    path = storage.orbax_path(path, "project checkpoint")  # Orbax wants absolute paths
    with atomic_output(path, folder=True, last=(INDEX_FILE,)) as tmp:
        # Orbax's default numpy handler deep-copies every array before writing; a full UNet would be
        # held twice. Save synchronously, without the copy, and uncompressed: zstd saves ~8% of a
        # checkpoint of weights and roughly doubles the time to restore it.
        handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
        registry = ocp.type_handlers.create_type_handler_registry((np.ndarray, handler))
        pytree = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
        checkpointer = ocp.Checkpointer(pytree)
        for name, (_, params) in weights.components.items():
            if not jax.tree_util.tree_leaves(params):
                continue  # a parameter-free component (pixel space): its config says it all
            checkpointer.save(tmp / name, args=ocp.args.PyTreeSave(jax.tree_util.tree_map(np.asarray, params)))
        index = dict(
            format=FORMAT_NAME,
            version=FORMAT_VERSION,
            model=weights.model,
            configs={name: config_to_dict(cfg) for name, (cfg, _) in weights.components.items()},
            metadata=dict(weights.metadata, saved=time.strftime("%Y-%m-%dT%H:%M:%S%z")),
        )
        # Orbax's `*/commit_success.txt` stay: on a bucket Orbax takes a checkpoint without one for unfinished
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return path


def is_project(path) -> bool:
    return (storage.path(path) / INDEX_FILE).is_file()


def load_project(path: str | Path, dtype: str | None = None, placement: Placement | None = None) -> PipelineWeights:
    """Read the project format; dtype (fp32|bf16|fp16) casts the params and sets each config's param_dtype.
    placement: restore each array straight onto the devices in its dtype and sharding (else numpy)."""
    import orbax.checkpoint as ocp

    path = storage.orbax_path(path, "project checkpoint")  # Orbax opens gs:// URLs itself
    index = json.loads((path / INDEX_FILE).read_text())
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        found = f"{index.get('format')} v{index.get('version')}"
        raise ValueError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} checkpoint (found {found})")
    overrides = param_dtype_overrides(dtype)
    components = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for name, fields in index["configs"].items():
            cfg = config_from_dict(name, fields).replace(**overrides)
            if not (path / name).exists():  # a parameter-free component (pixel space)
                check_params(name, cfg, {})
                components[name] = (cfg, {})
                continue
            # checked from the metadata, before anything is read (a wrong target fails obscurely in Orbax)
            check_params(name, cfg, checkpointer.metadata(path / name).item_metadata.tree)
            target = None if placement is None else placement.abstract(name, cfg)
            with Prefetch(whole_files([path / name])):
                params = checkpointer.restore(path / name, target)
            if target is None:
                to = cfg.param_dtype
                params = jax.tree_util.tree_map(lambda x, to=to: np.asarray(x).astype(to, copy=False), params)
            components[name] = (cfg, params)
    return PipelineWeights(index["model"], components, dict(index.get("metadata", {})))


# ---- diffusers folders -------------------------------------------------------------------------------


def is_diffusers_folder(path) -> bool:
    return (storage.path(path) / "model_index.json").is_file()


def load_diffusers(
    path: str | Path, variant: str | None = None, dtype: str | None = None, placement: Placement | None = None
) -> PipelineWeights:
    """A diffusers SDXL repository folder (`model_index.json` + component folders); base vs refiner from
    which text encoders it has. variant: e.g. "fp16" for `*.fp16.safetensors`; dtype casts (fp32|bf16|fp16);
    placement: each tensor onto the devices as it is read."""
    folder = storage.path(path)
    index = json.loads((folder / "model_index.json").read_text())
    present = {name for name, spec in index.items() if not name.startswith("_") and isinstance(spec, list) and spec[0]}
    model = "base" if "text_encoder" in present else "refiner"
    if missing := set(MODEL_COMPONENTS[model]) - present:
        listed = f"model_index.json lists {sorted(present)}"
        raise ConversionError(f"{folder}: an SDXL {model} folder needs {sorted(missing)} ({listed})")
    overrides = param_dtype_overrides(dtype)
    components = {
        name: load_component(name, folder / name, variant, placement, **overrides) for name in MODEL_COMPONENTS[model]
    }
    metadata = dict(source=str(folder), source_format="diffusers", pipeline=str(index.get("_class_name")))
    return PipelineWeights(model, components, metadata)


# ---- original single files -----------------------------------------------------------------------------


def load_single_file(
    path: str | Path, model: str | None = None, dtype: str | None = None, layout=None, placement=None
) -> PipelineWeights:
    """An original (sgm) SDXL single-file checkpoint: `.safetensors` (read lazily, no torch needed) or a
    weights-only `.ckpt`/`.pt` pickle. Base vs refiner is detected from the keys; `model` only checks it.
    dtype casts (fp32|bf16|fp16); default: the stored dtype. layout: a `SingleFileLayout` for files of
    non-standard shapes (default: SDXL's base or refiner, as detected). placement: each tensor onto the
    devices as it is read (a `Placement`); without one the leaves are numpy. Either way tensors are read
    one at a time."""
    from sdxl_jax.convert.files import PICKLE_SUFFIXES, LazySafetensors, TorchPickle, stored_dtype
    from sdxl_jax.convert.single_file import LAYOUTS, iter_single_file_to_diffusers, read_order
    from sdxl_jax.convert.single_file_keys import detect_model

    path = storage.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        state = LazySafetensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        state = TorchPickle(path)
    else:
        raise ConversionError(f"{path}: a single-file checkpoint is .safetensors or one of {PICKLE_SUFFIXES}")
    found = detect_model(state.keys())
    if model is not None and model != found:
        raise ConversionError(f"{path} is an SDXL {found} checkpoint, not a {model}")
    layout = layout or LAYOUTS[found]()
    overrides = param_dtype_overrides(dtype)
    components = {}
    ahead = state.byte_ranges(read_order(state, layout)) if isinstance(state, LazySafetensors) else whole_files([path])
    with Prefetch(ahead):
        for name, diffusers_state in iter_single_file_to_diffusers(state, layout):
            cfg = getattr(layout, name).replace(**(overrides or {"param_dtype": stored_dtype(diffusers_state)}))
            place = None if placement is None else placement.placer(name, cfg)
            components[name] = (cfg, COMPONENTS[name].params_from_torch(diffusers_state, cfg, place))
    metadata = dict(source=str(path), source_format="single-file")
    return PipelineWeights(found, components, metadata)


def load_pipeline_weights(
    path: str | Path,
    model: str | None = None,
    dtype: str | None = None,
    variant: str | None = None,
    placement: Placement | None = None,
) -> PipelineWeights:
    """Weights from anything users have: this project's checkpoint folder, a diffusers repository folder,
    or an original single-file checkpoint, read one tensor at a time. model ("base"|"refiner") is
    checked when given; placement (a `Placement`): each tensor cast and put on the devices as it is
    read, so peak host memory is the placed weights plus about one tensor."""
    path = storage.check_readable(path, "checkpoint")
    if path.is_dir():
        if is_project(path):
            weights = load_project(path, dtype, placement)
        elif is_diffusers_folder(path):
            weights = load_diffusers(path, variant, dtype, placement)
        else:
            neither = f"neither an {FORMAT_NAME} checkpoint ({INDEX_FILE}) nor a diffusers folder (model_index.json)"
            raise ConversionError(f"{path} is {neither}")
        if model is not None and weights.model != model:
            raise ConversionError(f"{path} holds an SDXL {weights.model}, not a {model}")
        return weights
    return load_single_file(path, model, dtype, placement=placement)


# ---- another VAE ---------------------------------------------------------------------------------------

SINGLE_FILE_VAE_PREFIX = "first_stage_model."  # where a whole single file keeps its VAE


def vae_interface_differences(cfg, like) -> list[str]:
    """How the VAE `cfg` differs from `like` (a pipeline's VAE) in what the UNet sees: the latent's channels,
    its downsampling and the scaling (and shift) into the UNet's latent space; empty when they agree."""
    fields = ("latent_channels", "downsample_factor", "scaling_factor", "shift_factor")
    return [f"{f} {getattr(cfg, f)} (the model's VAE: {getattr(like, f)})" for f in fields
            if getattr(cfg, f) != getattr(like, f)]  # fmt: skip


def load_vae_for(path, like, placement: Placement | None = None) -> tuple[VAEConfig, Any]:
    """(config, params) of a VAE to use instead of a pipeline's VAE `like`: a diffusers AutoencoderKL folder
    (`config.json` + weights), a diffusers pipeline folder (its `vae/`), or one weights file in the original
    ldm / sgm layout (Stability's `sdxl_vae.safetensors`; also a whole single file's `first_stage_model.`
    VAE), whose architecture is taken to be `like`'s since such a file records none (nor a scaling factor).

    Read strictly, like every checkpoint; placement as for the pipeline. The VAE must give the latents the
    UNet was trained on: a different latent interface (`vae_interface_differences`) or a pixel-space model
    is a ConversionError of one line. This project's checkpoints hold whole pipelines only (no VAE-only
    export exists), so a project folder is refused.
    """
    from sdxl_jax.convert.files import open_state_dict, stored_dtype
    from sdxl_jax.convert.single_file import vae_file_to_diffusers

    path = storage.check_readable(path, "VAE")
    if not isinstance(like, VAEConfig):
        raise ConversionError(f"the VAE {path}: this model works in pixel space; it has no VAE to replace")
    if path.is_dir():
        if is_project(path):
            what = f"this {FORMAT_NAME} checkpoint holds a whole pipeline (sdxl-convert exports its vae/)"
            raise ConversionError(f"{path}: a VAE is read from a diffusers folder or a weights file; {what}")
        folder = path / "vae" if is_diffusers_folder(path) else path
        if not (folder / "config.json").is_file():
            neither = "neither a diffusers AutoencoderKL folder (config.json) nor a pipeline folder with vae/"
            raise ConversionError(f"{path} is {neither}")
        cfg = COMPONENTS["vae"].config_from_torch(json.loads((folder / "config.json").read_text()))
        if differences := vae_interface_differences(cfg, like):
            raise ConversionError(f"the VAE {folder} does not fit the model: {'; '.join(differences)}")
        return load_component("vae", folder, placement=placement)
    state = open_state_dict(path)
    prefix = SINGLE_FILE_VAE_PREFIX if any(k.startswith(SINGLE_FILE_VAE_PREFIX) for k in state.keys()) else ""
    if differences := _vae_file_differences(state, prefix, like):
        raise ConversionError(f"the VAE {path} does not fit the model: {'; '.join(differences)}")
    diffusers_state = vae_file_to_diffusers(state, like, prefix)
    cfg = like.replace(param_dtype=stored_dtype(diffusers_state))
    place = None if placement is None else placement.placer("vae", cfg)
    with Prefetch(whole_files([path])):
        return cfg, COMPONENTS["vae"].params_from_torch(diffusers_state, cfg, place)


def _vae_file_differences(state, prefix: str, like: VAEConfig) -> list[str]:
    """The latent channels and levels of an original-layout VAE file, where they differ from `like`'s (the
    tensor-by-tensor check that follows names every other difference)."""
    levels = {k[len(prefix) :].split(".")[2] for k in state.keys() if k.startswith(f"{prefix}encoder.down.")}
    conv_in = f"{prefix}decoder.conv_in.weight"  # [C, latent, 3, 3]
    if conv_in not in state.keys() or not levels:
        return [f"not a VAE in the original layout (no {conv_in}, no {prefix}encoder.down.*)"]
    differences = []
    if (latent := shape_of(state, conv_in)[1]) != like.latent_channels:
        differences.append(f"latent_channels {latent} (the model's VAE: {like.latent_channels})")
    if len(levels) != len(like.block_out_channels):
        factor, want = 2 ** (len(levels) - 1), like.downsample_factor
        differences.append(f"downsample_factor {factor} (the model's VAE: {want})")
    return differences


def swap_vae(weights: PipelineWeights, path, placement: Placement | None = None) -> PipelineWeights:
    """`weights` with the VAE read from `path` (`load_vae_for`) instead of its own, recorded in the
    metadata as `vae`."""
    components = dict(weights.components, vae=load_vae_for(path, weights.config("vae"), placement))
    return PipelineWeights(weights.model, components, dict(weights.metadata, vae=str(path)))
