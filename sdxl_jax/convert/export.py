"""Writing a pipeline's weights back for the PyTorch tools: a diffusers folder, or an original single file.

    export_diffusers(weights, "out/")                   # StableDiffusionXL[Img2Img]Pipeline.from_pretrained
    export_single_file(weights, "out.safetensors")      # from_single_file, ComfyUI, the SD web UIs
    export_vae_diffusers(cfg, params, "vae/")           # a VAE alone: AutoencoderKL.from_pretrained
    export_vae_file(cfg, params, "vae.safetensors")     # a VAE alone in the ldm layout (sdxl_vae.safetensors)

Both are the exact inverses of the loaders (`load_diffusers`, `load_single_file`): the same key tables
run backwards, so PyTorch -> JAX -> PyTorch gives every tensor back bit for bit in the same dtype.

Tensors are streamed: each component's PyTorch state dict is a dict of numpy *views* of the Flax
params (a layout change is a transpose view), and `write_safetensors` makes one tensor contiguous (and
casts it, given `dtype`) at a time as it writes. Converting the full SDXL base needs little more memory
than the params themselves. Output goes to a temporary sibling that is renamed into place, so a failed
or interrupted export leaves nothing behind; an existing output is never overwritten.

Metadata (source, dtype, model, sdxl_jax version) goes into the single file's safetensors header, and
into `sdxl_jax_export.json` at the top of a diffusers folder.
"""

import json
import shutil
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import flax
import numpy as np
from flax.linen import meta

from sdxl_jax import __version__, storage
from sdxl_jax.convert.components import COMPONENTS
from sdxl_jax.convert.files import atomic_output, refuse_existing, stored_dtype
from sdxl_jax.convert.mapping import ConversionError, key_table
from sdxl_jax.convert.pipeline_weights import DTYPES, PipelineWeights, check_params
from sdxl_jax.convert.single_file import SingleFileLayout, diffusers_to_single_file, diffusers_to_vae_file
from sdxl_jax.convert.single_file_keys import component_prefixes
from sdxl_jax.convert.text_encoder import text_encoder_config_to_transformers
from sdxl_jax.convert.unet import unet_config_to_diffusers, unstack_scanned_blocks
from sdxl_jax.convert.vae import vae_config_to_diffusers
from sdxl_jax.diffusion.schedules import NUM_TRAIN_TIMESTEPS, SDXL_BETA_END, SDXL_BETA_START
from sdxl_jax.tokenizer import ASSETS_DIR

METADATA_FILE = "sdxl_jax_export.json"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release this folder layout is tested against

# ---- what a diffusers SDXL folder holds ----------------------------------------------------------------

PIPELINES = {
    "base": dict(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True),
    "refiner": dict(
        _class_name="StableDiffusionXLImg2ImgPipeline",
        force_zeros_for_empty_prompt=False,
        requires_aesthetics_score=True,
    ),
}
WEIGHTS_FILES = {name: f"{component.weights_stem}.safetensors" for name, component in COMPONENTS.items()}
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
# CLIP-L pads with the end token, OpenCLIP bigG with "!" (id 0); see sdxl_jax.tokenizer.
TOKENIZER_PAD = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
# SDXL's scheduler/scheduler_config.json (base and refiner alike).
SCHEDULER_CONFIG = dict(
    _class_name="EulerDiscreteScheduler",
    beta_start=SDXL_BETA_START,
    beta_end=SDXL_BETA_END,
    beta_schedule="scaled_linear",
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    prediction_type="epsilon",
    interpolation_type="linear",
    timestep_spacing="leading",
    steps_offset=1,
    use_karras_sigmas=False,
    trained_betas=None,
    clip_sample=False,
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)


def text_encoder_class(cfg) -> str:
    return text_encoder_config_to_transformers(cfg)["architectures"][0]


def model_index(weights: PipelineWeights) -> dict:
    """The pipeline's `model_index.json`: library and class per component, null for those it lacks."""
    classes = dict(
        unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"],
        scheduler=["diffusers", "EulerDiscreteScheduler"], feature_extractor=[None, None], image_encoder=[None, None],
    )  # fmt: skip
    for encoder, tokenizer in TOKENIZERS.items():
        present = encoder in weights.components
        classes[encoder] = ["transformers", text_encoder_class(weights.config(encoder))] if present else [None, None]
        classes[tokenizer] = ["transformers", "CLIPTokenizer"] if present else [None, None]
    return dict(PIPELINES[weights.model], _diffusers_version=DIFFUSERS_VERSION, **dict(sorted(classes.items())))


def component_config(name: str, weights: PipelineWeights, dtype: str) -> dict:
    """The `config.json` of one component folder; dtype: the one its weights are written in."""
    cfg = weights.config(name)
    if name == "unet":
        latent_size = weights.config("vae").sample_size // weights.config("vae").downsample_factor
        return dict(unet_config_to_diffusers(cfg, sample_size=latent_size), _diffusers_version=DIFFUSERS_VERSION)
    if name == "vae":
        return dict(vae_config_to_diffusers(cfg), _diffusers_version=DIFFUSERS_VERSION)
    return dict(text_encoder_config_to_transformers(cfg), dtype=dtype)


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """A transformers `CLIPTokenizer` folder from the shipped vocabulary (OpenAI CLIP's BPE)."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(ASSETS_DIR / name, folder / name)
    end = "<|endoftext|>"
    special = dict(bos_token="<|startoftext|>", eos_token=end, unk_token=end, pad_token=pad_token)
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True,
                  errors="replace", add_prefix_space=False, clean_up_tokenization_spaces=True)  # fmt: skip
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)


# ---- PyTorch state dicts as views of the params ----------------------------------------------------------


def torch_state(name: str, cfg, params, check: bool = True) -> dict[str, np.ndarray]:
    """One component's PyTorch state dict (diffusers / transformers keys, text encoders `text_model.`-prefixed
    as in the released files) as numpy views of `params`: nothing is copied. check: first check the
    params against `cfg` (every parameter present, none extra, shapes), naming the offenders. The keys come
    from the component table's `torch_key`, the functions `unet_params_to_diffusers` etc. use."""
    if check:
        check_params(name, cfg, params)
    params = meta.unbox(params)
    if name == "unet" and cfg.scan_layers:
        params = unstack_scanned_blocks(params)
    flat = flax.traverse_util.flatten_dict(params)
    table = key_table(params, COMPONENTS[name].torch_key(cfg))
    return {key: to_torch(np.asarray(flat[path])) for path, (key, (_, _, to_torch)) in table.items()}


# ---- safetensors, streamed -----------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
SAFETENSORS_NUMPY = {code: np.dtype(name) for name, code in SAFETENSORS_DTYPES.items()}


class Progress(NamedTuple):
    """Where an export stands, after each tensor written."""

    component: str
    tensors: int
    total_tensors: int
    bytes: int
    total_bytes: int


ProgressFn = Callable[[Progress], None]


class Written(NamedTuple):
    """What an export wrote."""

    path: Path
    tensors: int
    parameters: int
    bytes: int


def target_dtype(dtype: str | None, stored: np.dtype) -> np.dtype:
    """The dtype a tensor is written in: `dtype` (fp32|bf16|fp16) for floating tensors, else as stored."""
    if dtype is None or not (np.issubdtype(stored, np.floating) or stored.name == "bfloat16"):
        return np.dtype(stored)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return np.dtype(DTYPES[dtype])  # jax registers ml_dtypes' bfloat16 with numpy


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    *,
    dtype: str | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> int:
    """Write `tensors` as a `.safetensors` file, one tensor in memory at a time; returns the bytes of data.

    A value needs only `.shape` and `.dtype` for the header and `np.asarray` for its data, so views and
    lazily computed arrays stream. dtype: cast floating tensors (fp32|bf16|fp16). on_tensor(name,
    nbytes) is called after each tensor. The file is written in place (callers make it atomic).
    """
    header, offset = {}, 0
    for name, value in tensors.items():
        out = target_dtype(dtype, np.dtype(value.dtype))
        if out.name not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{name}: safetensors has no type for {out.name}")
        size = int(np.prod(value.shape, dtype=np.int64)) * out.itemsize
        offsets = [offset, offset + size]
        header[name] = dict(dtype=SAFETENSORS_DTYPES[out.name], shape=list(value.shape), data_offsets=offsets)
        offset += size
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, value in tensors.items():
            entry = header[name]
            array = np.asarray(value).astype(SAFETENSORS_NUMPY[entry["dtype"]], order="C", copy=False)
            if list(array.shape) != entry["shape"]:
                raise ConversionError(f"{name}: the array has shape {array.shape}, its header {tuple(entry['shape'])}")
            f.write(array.reshape(-1).view(np.uint8).data)
            if on_tensor is not None:
                on_tensor(name, array.nbytes)
            del array
    return offset


# ---- the exports ----------------------------------------------------------------------------------------


def export_metadata(weights: PipelineWeights, states: Mapping[str, Mapping], dtype: str | None) -> dict[str, str]:
    """The source's metadata plus what this export is: model, dtype written, sdxl_jax version, time."""
    written = sorted({target_dtype(dtype, np.dtype(v.dtype)).name for s in states.values() for v in s.values()})
    exported = dict(model=weights.model, dtype=",".join(written), sdxl_jax_version=__version__,
                    exported=time.strftime("%Y-%m-%dT%H:%M:%S%z"))  # fmt: skip
    return {k: str(v) for k, v in weights.metadata.items()} | exported


class _Tally:
    """Counts written tensors over a whole export and reports them to a ProgressFn. `component` names
    what is being written: set it per file, or give `component_of(tensor name)`."""

    def __init__(self, states, dtype: str | None, progress: ProgressFn | None, component_of=None):
        self.progress, self.component_of, self.component, self.tensors, self.bytes = progress, component_of, "", 0, 0
        self.total_tensors = sum(len(s) for s in states.values())
        self.total_bytes = sum(
            int(np.prod(v.shape, dtype=np.int64)) * target_dtype(dtype, np.dtype(v.dtype)).itemsize
            for s in states.values() for v in s.values()
        )  # fmt: skip

    def __call__(self, name: str, nbytes: int) -> None:
        self.tensors, self.bytes = self.tensors + 1, self.bytes + nbytes
        if self.component_of is not None:
            self.component = self.component_of(name)
        if self.progress is not None:
            self.progress(Progress(self.component, self.tensors, self.total_tensors, self.bytes, self.total_bytes))


def _num_parameters(states: Mapping[str, Mapping[str, np.ndarray]]) -> int:
    return sum(int(np.prod(v.shape, dtype=np.int64)) for s in states.values() for v in s.values())


def export_diffusers(
    weights: PipelineWeights, out_dir: str | Path, dtype: str | None = None, progress: ProgressFn | None = None
) -> Written:
    """Write `weights` as a diffusers SDXL folder (base: `StableDiffusionXLPipeline`, refiner:
    `StableDiffusionXLImg2ImgPipeline`), atomically; `out_dir` must not exist.

    Holds model_index.json, unet/ vae/ text_encoder/ text_encoder_2/ (config.json + safetensors),
    tokenizer/ tokenizer_2/ (the shipped CLIP vocabulary), scheduler/ (SDXL's Euler config) and
    `sdxl_jax_export.json`. dtype: fp32|bf16|fp16 (default: as stored). progress: called per tensor.
    """
    refuse_existing(out_dir)
    states = {name: torch_state(name, cfg, params) for name, (cfg, params) in weights.components.items()}
    metadata = export_metadata(weights, states, dtype)
    tally = _Tally(states, dtype, progress)
    with atomic_output(out_dir, folder=True, last=("model_index.json",)) as tmp:
        for name, state in states.items():
            (tmp / name).mkdir()
            written_dtype = target_dtype(dtype, np.dtype(stored_dtype(state))).name
            _write_json(tmp / name / "config.json", component_config(name, weights, written_dtype))
            tally.component = name
            write_safetensors(tmp / name / WEIGHTS_FILES[name], state, dict(format="pt"), dtype=dtype, on_tensor=tally)
        for encoder, tokenizer in TOKENIZERS.items():
            if encoder in weights.components:
                write_tokenizer(tmp / tokenizer, TOKENIZER_PAD[tokenizer])
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        _write_json(tmp / "model_index.json", model_index(weights))
        _write_json(tmp / METADATA_FILE, metadata)
    return Written(Path(out_dir), tally.tensors, _num_parameters(states), tally.bytes)


def architecture(cfg):
    """`cfg` with its runtime fields (dtype, remat, ...) at their defaults, `cfg.architecture()`: a layout
    built from it serves every dtype and implementation choice, so one (cached) single-file plan does."""
    return cfg.architecture()


def single_file_layout(weights: PipelineWeights) -> SingleFileLayout:
    """The single-file layout of `weights`' own configs (SDXL's for the released models)."""
    text_encoder = architecture(weights.config("text_encoder")) if "text_encoder" in weights.components else None
    configs = (architecture(weights.config(name)) for name in ("unet", "vae", "text_encoder_2"))
    unet, vae, text_encoder_2 = configs
    return SingleFileLayout(unet, vae, text_encoder, text_encoder_2)


def export_single_file(
    weights: PipelineWeights, out_file: str | Path, dtype: str | None = None, progress: ProgressFn | None = None
) -> Written:
    """Write `weights` as an original (sgm) single-file `.safetensors` checkpoint, atomically; `out_file`
    must not exist. The metadata goes into the header (`format: pt` plus source, model, dtype, version).
    dtype: fp32|bf16|fp16 (default: as stored). progress: called per tensor."""
    out_file = storage.path(out_file)
    if out_file.suffix != ".safetensors":
        raise ValueError(f"{out_file}: a single-file export is written as .safetensors")
    refuse_existing(out_file)
    # diffusers_to_single_file checks every tensor against the configs (by its diffusers key)
    states = {name: torch_state(name, cfg, params, check=False) for name, (cfg, params) in weights.components.items()}
    metadata = export_metadata(weights, states, dtype)
    single_file = diffusers_to_single_file(states, single_file_layout(weights))
    del states  # the single file's tensors are views of the params too (bigG's q/k/v are stacked copies)
    prefixes = component_prefixes(weights.model).items()
    tally = _Tally({"": single_file}, dtype, progress, lambda key: next(c for c, p in prefixes if key.startswith(p)))
    with atomic_output(out_file, folder=False) as tmp:
        write_safetensors(tmp, single_file, dict(format="pt") | metadata, dtype=dtype, on_tensor=tally)
    return Written(out_file, tally.tensors, _num_parameters({"": single_file}), tally.bytes)


def _vae_metadata(state, metadata: Mapping[str, str], dtype: str | None) -> dict[str, str]:
    written = sorted({target_dtype(dtype, np.dtype(v.dtype)).name for v in state.values()})
    exported = dict(model="vae", dtype=",".join(written), sdxl_jax_version=__version__,
                    exported=time.strftime("%Y-%m-%dT%H:%M:%S%z"))  # fmt: skip
    return {str(k): str(v) for k, v in metadata.items()} | exported


def export_vae_diffusers(
    cfg, params, out_dir: str | Path, metadata: Mapping[str, str] | None = None, dtype: str | None = None
) -> Written:
    """Write one VAE as a diffusers `AutoencoderKL` folder (`config.json`, the weights, and
    `sdxl_jax_export.json` with `metadata`), atomically; `out_dir` must not exist. What
    `AutoencoderKL.from_pretrained(out_dir)`, `Pipeline.load(vae=out_dir)` and `sample.py --vae` read."""
    refuse_existing(out_dir)
    state = torch_state("vae", cfg, params)
    tally = _Tally({"vae": state}, dtype, None)
    with atomic_output(out_dir, folder=True, last=("config.json",)) as tmp:
        write_safetensors(tmp / WEIGHTS_FILES["vae"], state, dict(format="pt"), dtype=dtype, on_tensor=tally)
        _write_json(tmp / METADATA_FILE, _vae_metadata(state, metadata or {}, dtype))
        _write_json(tmp / "config.json", dict(vae_config_to_diffusers(cfg), _diffusers_version=DIFFUSERS_VERSION))
    return Written(Path(out_dir), tally.tensors, _num_parameters({"vae": state}), tally.bytes)


def export_vae_file(
    cfg, params, out_file: str | Path, metadata: Mapping[str, str] | None = None, dtype: str | None = None
) -> Written:
    """Write one VAE as a `.safetensors` file in the original ldm / sgm layout, unprefixed (the layout of
    Stability's `sdxl_vae.safetensors`, which the web UIs and `load_vae_for` read), `metadata` in its
    header, atomically; `out_file` must not exist. The file records no architecture: it is `cfg`'s."""
    out_file = storage.path(out_file)
    if out_file.suffix != ".safetensors":
        raise ValueError(f"{out_file}: a VAE file is written as .safetensors")
    refuse_existing(out_file)
    state = diffusers_to_vae_file(torch_state("vae", cfg, params), cfg)
    tally = _Tally({"vae": state}, dtype, None)
    with atomic_output(out_file, folder=False) as tmp:
        header = dict(format="pt") | _vae_metadata(state, metadata or {}, dtype)
        write_safetensors(tmp, state, header, dtype=dtype, on_tensor=tally)
    return Written(out_file, tally.tensors, _num_parameters({"vae": state}), tally.bytes)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
