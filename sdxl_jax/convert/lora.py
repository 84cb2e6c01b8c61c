"""LoRA files as users have them (kohya sd-scripts, diffusers / PEFT, ComfyUI), merged into loaded weights.

    weights = load_pipeline_weights("sd_xl_base_1.0.safetensors", placement=...)
    weights = merge_loras(weights, [("style.safetensors", 0.8), ("detail.safetensors", 0.5)])

A LoRA module names one base weight W (a Linear or a Conv2d, PyTorch layout [out, in(, kh, kw)]) and
holds down D [r, in(, kh, kw)], up U [out, r(, 1, 1)] and alpha (kohya: a `.alpha` tensor; diffusers:
`lora_adapter_metadata` in the file's header, per component; neither: alpha = r). Merging adds

    scale * (alpha / r) * (U.flatten(1) @ D.flatten(1)).reshape(W.shape)

to W in PyTorch layout, laid out into Flax by the same rule the loaders use (`mapping.key_table`), in
fp32, then cast back to W's dtype: once, at load, so sampling costs nothing extra. Several LoRAs add.

Module names are accepted in every spelling these tools write (one table per loaded model,
`module_table`): kohya `lora_unet_<sgm path>` (SDXL's; `input_blocks_4_1_transformer_blocks_0_attn1_to_q`)
or `lora_unet_<diffusers path>`, `lora_te1_` (CLIP-L) and `lora_te2_` (bigG) `text_model_...`;
diffusers `unet.<path>`, `text_encoder.<path>`, `text_encoder_2.<path>`, with the old attention-processor
forms (`attn1.processor.to_q_lora.down.weight`, `to_out_lora` for `to_out.0`). Tensor suffixes: see
`_ROLES`.
"""

import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import storage
from sdxl_jax.convert.components import COMPONENTS
from sdxl_jax.convert.files import LazySafetensors, atomic_output
from sdxl_jax.convert.mapping import ConversionError, key_table
from sdxl_jax.convert.single_file_keys import single_file_name, unet_names
from sdxl_jax.convert.unet import stack_scanned_blocks, unstack_scanned_blocks

log = logging.getLogger("sdxl_jax")

# tensor-name suffix -> role, longest first where one ends another
_ROLES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
}  # fmt: skip
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
DIFFUSERS_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig per component, JSON, keys "unet.r", ...


def parse_lora(spec: str) -> tuple[str, float]:
    """`PATH[:SCALE]` (as `--lora` takes it) -> (path, scale); the scale defaults to 1. A URL's own colon
    (`gs://...`) is not a scale: only a number after the last colon is."""
    path, _, scale = spec.rpartition(":")
    try:
        return (path, float(scale)) if path else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def parse_loras(specs: str) -> list[tuple[str, float]]:
    """A comma-separated list of `PATH[:SCALE]` (the sampling config's `loras`)."""
    return [parse_lora(spec.strip()) for spec in specs.split(",") if spec.strip()]


class LoraModule:
    """One LoRA module of a file: the weight it targets (a `Module`) and its tensors (PyTorch layout)."""

    def __init__(self, target: "Module"):
        self.target = target
        self.down: np.ndarray | None = None
        self.up: np.ndarray | None = None
        self.alpha: float | None = None

    def delta(self, scale: float) -> np.ndarray:
        """scale * alpha / r * U @ D, in the base weight's PyTorch shape, fp32."""
        rank = self.down.shape[0]
        alpha = rank if not self.alpha else self.alpha
        up, down = self.up.astype(np.float32).reshape(self.up.shape[0], -1), self.down.astype(np.float32)
        return (scale * alpha / rank * (up @ down.reshape(rank, -1))).reshape(self.target.torch_shape)


class Module(NamedTuple):
    """A weight a LoRA can target: where it is, its layout and the names files give it."""

    component: str
    path: tuple[str, ...]  # of its Flax kernel
    torch_key: str
    torch_shape: tuple[int, ...]
    to_flax: object  # PyTorch -> Flax layout rule
    to_torch: object
    kohya: str  # what kohya sd-scripts writes (sgm names for the UNet)
    diffusers: str  # what diffusers writes (`unet.` / `text_encoder.` / `text_encoder_2.` + module; text
    # modules without `text_model.`, as diffusers writes them with transformers >= 5.6)
    aliases: tuple[str, ...]  # other spellings readers meet; the first: kohya with the diffusers module name


def modules(weights) -> list[Module]:
    """Every module a LoRA can target in `weights` (a `PipelineWeights`; only configs are used): the
    matrices and kernels of the UNet and the text encoders."""
    from sdxl_jax.convert.pipeline_weights import ABSTRACT_PARAMS

    out = []
    for component, (cfg, _) in weights.components.items():
        if component not in KOHYA_PREFIXES:
            continue
        if component == "unet":
            cfg = cfg.replace(scan_layers=False)  # modules are named per block; `merge_loras` unstacks
        abstract = nn.meta.unbox(ABSTRACT_PARAMS[component](cfg))
        flat = flax.traverse_util.flatten_dict(abstract)
        sgm = unet_names(cfg) if component == "unet" else None
        kohya, diffusers = KOHYA_PREFIXES[component], DIFFUSERS_PREFIXES[component]
        if component == "text_encoder_2" and weights.model == "refiner":
            kohya = "lora_te_"  # the refiner's one text encoder
        for path, (key, (_, to_flax, to_torch)) in key_table(abstract, COMPONENTS[component].torch_key(cfg)).items():
            if not key.endswith(".weight") or len(flat[path].shape) < 2:
                continue  # biases and norms: LoRA adapts matrices and kernels
            module = key[: -len(".weight")]
            torch_shape = to_torch(np.broadcast_to(np.float32(0), flat[path].shape)).shape
            aliases = [kohya + module.replace(".", "_"), diffusers + module]
            short = module.removeprefix("text_model.")  # transformers >= 5.6 leaves the prefix out (diffusers too)
            aliases += [kohya + short.replace(".", "_")]
            named = single_file_name(sgm, module)[0] if sgm is not None else module
            out.append(Module(component, path, key, torch_shape, to_flax, to_torch,
                              kohya + named.replace(".", "_"), diffusers + short, tuple(aliases)))  # fmt: skip
    return out


def adapter_name(module: Module) -> str:
    """How trained adapters are keyed (`train.lora`): "component/flax/path/of/kernel"."""
    return f"{module.component}/{'/'.join(module.path)}"


def target_kernels(weights, spec) -> dict:
    """`{adapter_name: kernel}` of the kernels in `weights` (a `PipelineWeights`) that `spec` (a
    `train.lora.LoraSpec`) puts an adapter on: what `train.lora.init_adapters` takes."""
    flat = {c: flax.traverse_util.flatten_dict(p) for c, (_, p) in weights.components.items()}
    return {
        adapter_name(m): flat[m.component][m.path]
        for m in modules(weights)
        if spec.targets_module(m.component, m.torch_key.removesuffix(".weight"))
    }


def module_table(weights) -> dict[str, Module]:
    """Every accepted spelling of every module a LoRA can target in `weights` -> the module."""
    return {name: m for m in modules(weights) for name in (m.kohya, m.diffusers, *m.aliases)}


def _split(key: str) -> tuple[str, str] | None:
    """(module name, role) of one LoRA tensor name, or None."""
    for suffix, role in _ROLES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            module = module.replace(".processor.", ".")  # diffusers' attention-processor spelling
            return re.sub(r"\.to_out$", ".to_out.0", module), role
    return None


def _alphas_from_metadata(metadata: Mapping[str, str]) -> dict[str, tuple[float, dict]]:
    """diffusers prefix ("unet", ...) -> (lora_alpha, alpha_pattern) from `lora_adapter_metadata`."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ConversionError(f"{METADATA_KEY} in the header is not JSON ({e})") from None
    out = {}
    if any(k.endswith(".use_rslora") and v for k, v in config.items()):
        raise ConversionError("rank-stabilised LoRAs (use_rslora: alpha / sqrt(r)) are not supported")
    for prefix in DIFFUSERS_PREFIXES:
        if f"{prefix}.lora_alpha" in config:
            out[prefix] = (float(config[f"{prefix}.lora_alpha"]), config.get(f"{prefix}.alpha_pattern") or {})
    return out


def read_lora(path, table: Mapping, strict: bool = True) -> list[LoraModule]:
    """The modules of a LoRA file (`.safetensors`), matched against `module_table(weights)`. Unknown
    names, missing halves and shape mismatches are one `ConversionError` naming the first offender and
    the count; strict=False skips unknown modules with a counted warning instead."""
    name = storage.path(path).name
    state = LazySafetensors(path)
    found_modules: dict[str, LoraModule] = {}
    unknown, unparsed = [], []
    for key in state:
        split = _split(key)
        if split is None:
            (unparsed if not key.endswith(".dora_scale") else unknown).append(key)
            continue
        module, role = split
        entry = table.get(module)
        if entry is None:
            unknown.append(key)
            continue
        found = found_modules.setdefault(module, LoraModule(entry))
        value = state[key]
        if role == "alpha":
            found.alpha = float(np.asarray(value, np.float32).reshape(()))
        else:
            setattr(found, role, value)
    if unparsed:
        raise ConversionError(
            f"{name}: {len(unparsed)} tensors are no LoRA tensor this loader knows, e.g. {unparsed[0]}"
        )
    if unknown:
        what = f"{name}: {len(unknown)} tensors name no module of this SDXL model, e.g. {unknown[0]}"
        if any(k.endswith(".dora_scale") for k in unknown):
            raise ConversionError(f"{name}: DoRA LoRAs (dora_scale) are not supported")
        if strict:
            raise ConversionError(f"{what} (a LoRA for another model? --lora_strict=false skips them)")
        log.warning("%s; skipped", what)
    alphas = _alphas_from_metadata(state.metadata())
    by_module = {id(m): n for n, m in found_modules.items()}
    bad = []
    for module in found_modules.values():
        label = by_module[id(module)]
        if module.down is None or module.up is None:
            bad.append(f"{label} has only its {'up' if module.down is None else 'down'} half")
            continue
        rank, out, base = module.down.shape[0], module.up.shape[0], module.target.torch_shape
        pointwise_up = all(n == 1 for n in module.up.shape[2:])
        if module.up.shape[1] != rank or out != base[0] or tuple(module.down.shape[1:]) != base[1:] or not pointwise_up:
            shapes = f"down {tuple(module.down.shape)}, up {tuple(module.up.shape)}"
            bad.append(f"{label}: {shapes} do not fit the weight's {base}")
        if module.alpha is None and (prefix := label.split(".", 1)[0]) in alphas:
            alpha, pattern = alphas[prefix]
            inner = label.split(".", 1)[1]
            matches = (v for k, v in pattern.items() if inner == k or inner.endswith("." + k))
            module.alpha = float(next(matches, alpha))
    if bad:
        raise ConversionError(f"{name}: {len(bad)} modules do not match this SDXL model, e.g. {bad[0]}")
    return list(found_modules.values())


_ADD = jax.jit(lambda w, d: (w.astype(jnp.float32) + d).astype(w.dtype), donate_argnums=0)


def merge_loras(weights, loras: Iterable[tuple[str, float]], strict: bool = True):
    """`weights` (a `PipelineWeights`, leaves numpy or device arrays) with each `(path, scale)` LoRA merged
    in, in order; a device leaf is updated where it lives (donated, so no second copy is held)."""
    loras = list(loras)
    if not loras:
        return weights
    table = module_table(weights)
    scanned = {name for name, (cfg, _) in weights.components.items() if getattr(cfg, "scan_layers", False)}
    params = {
        name: flax.traverse_util.flatten_dict(unstack_scanned_blocks(p) if name in scanned else p)
        for name, (_, p) in weights.components.items()
    }
    for path, scale in loras:
        modules = read_lora(path, table, strict)
        for module in modules:
            target = module.target
            delta = np.asarray(target.to_flax(module.delta(scale)), np.float32)
            flat = params[target.component]
            w = flat[target.path]
            if isinstance(w, jax.Array):
                flat[target.path] = _ADD(w, delta)
            else:
                flat[target.path] = (np.asarray(w, np.float32) + delta).astype(w.dtype)
        log.info("merged LoRA %s at scale %g: %d modules", storage.path(path).name, scale, len(modules))
    components = {}
    for name, (cfg, p) in weights.components.items():
        tree = flax.traverse_util.unflatten_dict(params[name]) if params[name] else p
        components[name] = (cfg, stack_scanned_blocks(tree) if name in scanned else tree)
    merged_in = ",".join(f"{storage.path(path).name}:{scale:g}" for path, scale in loras)
    metadata = dict(weights.metadata) | {"loras": ",".join(filter(None, [weights.metadata.get("loras"), merged_in]))}
    return type(weights)(weights.model, components, metadata)


FORMATS = ("kohya", "diffusers")
KOHYA_BASE_VERSIONS = {"base": "sdxl_base_v1-0", "refiner": "sdxl_refiner_v1-0"}


def save_lora(adapters: Mapping, spec, weights, path, fmt: str = "kohya", metadata: Mapping[str, str] | None = None):
    """Write trained adapters (`train.lora`: `{"component/flax/path": {"down", "up"}}`, Flax layout) as a
    LoRA file every SDXL tool loads. fmt "kohya": `lora_unet_<sgm name>` / `lora_te1_` / `lora_te2_` with
    `.lora_down.weight`, `.lora_up.weight`, `.alpha` and kohya's `ss_*` / `modelspec.*` header entries;
    "diffusers": `pytorch_lora_weights.safetensors` keys (`unet.<module>.lora_A.weight`, `lora_B`) with
    the adapters' ranks and alphas in `lora_adapter_metadata`. weights: the `PipelineWeights` (configs
    only are read) the adapters were trained on; metadata: extra header entries (strings)."""
    from sdxl_jax.convert.export import write_safetensors

    if fmt not in FORMATS:
        raise ValueError(f"LoRA format must be one of {FORMATS}, got {fmt!r}")
    by_name = {adapter_name(m): m for m in modules(weights)}
    if unknown := set(adapters) - by_name.keys():
        raise ConversionError(f"{len(unknown)} adapters name no module of this model, e.g. {sorted(unknown)[0]}")
    tensors, config = {}, {}
    for name in sorted(adapters):
        m, down, up = by_name[name], np.asarray(adapters[name]["down"]), np.asarray(adapters[name]["up"])
        rank, alpha = spec.rank_alpha((*down.shape[:-1], up.shape[-1]))
        down_torch = np.ascontiguousarray(m.to_torch(down))  # the kernel's own layout rule: [r, in(, kh, kw)]
        up_torch = np.ascontiguousarray(up.T.reshape(*up.T.shape, *([1, 1] if len(m.torch_shape) == 4 else [])))
        if fmt == "kohya":
            tensors |= {f"{m.kohya}.lora_down.weight": down_torch, f"{m.kohya}.lora_up.weight": up_torch,
                        f"{m.kohya}.alpha": np.asarray(alpha, np.float32)}  # fmt: skip
        else:
            tensors |= {f"{m.diffusers}.lora_A.weight": down_torch, f"{m.diffusers}.lora_B.weight": up_torch}
            prefix, module = m.diffusers.split(".", 1)
            entry = config.setdefault(prefix, {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": [],
                                               "rank_pattern": {}, "alpha_pattern": {}})  # fmt: skip
            entry["target_modules"].append(module)
            if (rank, alpha) != (spec.rank, spec.alpha):
                entry["rank_pattern"][module], entry["alpha_pattern"][module] = rank, alpha
    header = dict(metadata or {})
    if fmt == "kohya":
        conv_rank, conv_alpha = spec.rank_alpha((3, 3, 1, 1))
        args = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)} if spec.targets == "conv" else {}
        header |= {
            "ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank),
            "ss_network_alpha": str(spec.alpha), "ss_network_args": json.dumps(args),
            "ss_base_model_version": KOHYA_BASE_VERSIONS[weights.model], "ss_v2": "False",
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": f"stable-diffusion-xl-v1-{weights.model}/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        }  # fmt: skip
    else:
        packed = {f"{p}.{k}": v for p, entry in config.items() for k, v in entry.items()}
        header[METADATA_KEY] = json.dumps(packed)
    with atomic_output(path, folder=False) as tmp:  # refuses an existing file; nothing half-written stays
        write_safetensors(tmp, tensors, header)
