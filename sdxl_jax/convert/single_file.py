"""The original single-file SDXL checkpoint (sgm / "ldm" layout) <-> per-component diffusers state dicts.

`single_file_plan` lists one `Op` per single-file tensor: its component, its diffusers key(s), the op
kind and both sides' shapes. Import (`single_file_to_diffusers`) runs every op forward and export
(`diffusers_to_single_file`) runs the same ops backward, so export is the exact inverse of import.
Both are strict: every source tensor is consumed once (apart from named ignorable buffers), every
expected tensor produced once, every shape checked, and an error names the offenders.

The expected diffusers tensors are those of this project's Flax models (`diffusers_shapes`), or any
table the caller passes (a manifest, a torch model's state-dict shapes). The per-component converters
(`unet_params_from_diffusers`, ...) take the import's result from there. Tensors pass through as numpy
views where the op allows (copy, squeeze, split), so nothing is copied twice; the import can be
iterated component by component (`iter_single_file_to_diffusers`) from a lazy mapping of the file.
"""

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from sdxl_jax.convert.components import COMPONENTS
from sdxl_jax.convert.mapping import ConversionError, check_tensors, dtype_of, offenders, shape_of, torch_shapes
from sdxl_jax.convert.single_file_keys import (
    POSITION_IDS,
    NameTable,
    bigg_names,
    clip_l_names,
    component_prefixes,
    detect_model,
    ignorable_keys,
    single_file_name,
    unet_names,
    vae_names,
)
from sdxl_jax.convert.text_encoder import TEXT_MODEL_PREFIX
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig

Shape = tuple[int, ...]
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclasses.dataclass(frozen=True)
class SingleFileLayout:
    """The models one single file holds; their configs fix every tensor name and shape."""

    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig | None  # CLIP-L: base only
    text_encoder_2: CLIPTextConfig  # OpenCLIP bigG (with its projection)

    def __post_init__(self):
        if self.text_encoder_2.projection_dim is None:
            raise ValueError("text_encoder_2 (OpenCLIP bigG) needs its projection: projection_dim is None")

    @property
    def model(self) -> str:
        """The model kind: "base" (two text encoders) or "refiner" (bigG only)."""
        return "refiner" if self.text_encoder is None else "base"

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(component_prefixes(self.model))

    def name_tables(self) -> dict[str, NameTable]:
        tables = {"unet": unet_names(self.unet), "vae": vae_names(self.vae), "text_encoder": clip_l_names()}
        tables["text_encoder_2"] = bigg_names(self.text_encoder_2.num_layers)
        return {c: tables[c] for c in self.components}

    @classmethod
    def sdxl_base(cls) -> "SingleFileLayout":
        clip_l, bigg = CLIPTextConfig.clip_vit_l14(), CLIPTextConfig.openclip_vit_bigg14()
        return cls(UNetConfig.sdxl_base(), VAEConfig.sdxl(), clip_l, bigg)

    @classmethod
    def sdxl_refiner(cls) -> "SingleFileLayout":
        return cls(UNetConfig.sdxl_refiner(), VAEConfig.sdxl(), None, CLIPTextConfig.openclip_vit_bigg14())


LAYOUTS: dict[str, Callable[[], SingleFileLayout]] = {
    "base": SingleFileLayout.sdxl_base,
    "refiner": SingleFileLayout.sdxl_refiner,
}


def _layout(model: str | SingleFileLayout) -> SingleFileLayout:
    if isinstance(model, SingleFileLayout):
        return model
    if model not in LAYOUTS:
        raise ValueError(f"unknown single-file model {model!r}; known: {sorted(LAYOUTS)} or a SingleFileLayout")
    return LAYOUTS[model]()


# --- ops ------------------------------------------------------------------------------------------


def _stacked(shapes: tuple[Shape, ...]) -> Shape:
    if len(set(shapes)) != 1:
        raise ConversionError(f"the parts of a stacked tensor differ in shape: {shapes}")
    return (len(shapes) * shapes[0][0], *shapes[0][1:])


@dataclasses.dataclass(frozen=True)
class OpKind:
    """How one single-file tensor becomes `parts` diffusers tensors, and back."""

    forward: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    inverse: Callable[[Sequence[np.ndarray]], np.ndarray]
    single_file_shape: Callable[[tuple[Shape, ...]], Shape]  # from the diffusers shapes
    parts: int = 1


OP_KINDS: dict[str, OpKind] = {
    "copy": OpKind(lambda a: (a,), lambda xs: xs[0], lambda s: s[0]),
    # a 1x1 conv weight [out, in, 1, 1] <-> a Linear weight [out, in] (the VAE's mid attention)
    "squeeze": OpKind(lambda a: (a[:, :, 0, 0],), lambda xs: xs[0][:, :, None, None], lambda s: (*s[0], 1, 1)),
    # `x @ P` <-> a Linear weight P.T (bigG's text_projection)
    "transpose": OpKind(
        lambda a: (np.ascontiguousarray(a.T),), lambda xs: np.ascontiguousarray(xs[0].T), lambda s: s[0][::-1]
    ),
    # q, k, v stacked by rows (bigG's attn.in_proj_weight / in_proj_bias) <-> q_proj, k_proj, v_proj
    "split": OpKind(lambda a: tuple(np.split(a, 3)), lambda xs: np.concatenate(xs), _stacked, parts=3),
}


@dataclasses.dataclass(frozen=True)
class Op:
    """One single-file tensor and the diffusers tensor(s) of `component` it holds."""

    component: str
    kind: str  # a key of OP_KINDS
    single_file: str
    single_file_shape: Shape
    diffusers: tuple[str, ...]  # in part order (q, k, v for a split)
    diffusers_shapes: tuple[Shape, ...]

    def forward(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """The single-file tensor -> {diffusers key: tensor}."""
        return dict(zip(self.diffusers, OP_KINDS[self.kind].forward(tensor), strict=True))

    def inverse(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        """The diffusers tensors, in `self.diffusers` order -> the single-file tensor."""
        return OP_KINDS[self.kind].inverse(tensors)


# --- the plan -------------------------------------------------------------------------------------


def diffusers_shapes(model: str | SingleFileLayout) -> dict[str, dict[str, Shape]]:
    """Component -> {diffusers key: PyTorch shape} of this project's Flax models for `model`.

    Uses `jax.eval_shape` (nothing is allocated); the full-size UNet takes a few seconds of tracing.
    Text-encoder keys are in the `text_model.`-prefixed form.
    """
    layout = _layout(model)
    configs = {c: getattr(layout, c) for c in layout.components} | {"unet": layout.unet.replace(scan_layers=False)}
    return {
        c: torch_shapes(COMPONENTS[c].abstract_params(cfg), COMPONENTS[c].torch_key(cfg)) for c, cfg in configs.items()
    }


def _canonical_names(component: str, keys) -> dict[str, str]:
    """Canonical diffusers key -> the key as given. Text-encoder keys without `text_model.` (transformers
    >= 5.6 `CLIPTextModel`) get it; `text_projection` sits beside `text_model` in either form."""
    keys = list(keys)
    if component not in TEXT_COMPONENTS or any(k.startswith(TEXT_MODEL_PREFIX) for k in keys):
        return {k: k for k in keys}
    return {(k if k.startswith("text_projection.") else TEXT_MODEL_PREFIX + k): k for k in keys}


def single_file_plan(
    model: str | SingleFileLayout, shapes: Mapping[str, Mapping[str, Sequence[int]]] | None = None
) -> list[Op]:
    """One `Op` per single-file tensor of `model` ("base", "refiner" or a `SingleFileLayout`).

    shapes: component -> {diffusers key: PyTorch shape}, the expected tensors (default:
    `diffusers_shapes(model)`, the plan then cached per layout); text-encoder keys in either form,
    `position_ids` buffers skipped.
    """
    layout = _layout(model)
    if shapes is None:
        return list(_default_plan(layout))
    if set(shapes) != set(layout.components):
        have = sorted(shapes)
        raise ConversionError(f"an SDXL {layout.model} single file has {layout.components}; shapes for {have}")
    return _plan(layout.name_tables(), component_prefixes(layout.model), shapes)


def _plan(
    tables: Mapping[str, NameTable], prefixes: Mapping[str, str], shapes: Mapping[str, Mapping[str, Sequence[int]]]
) -> list[Op]:
    """The ops of the components `tables` names, each component's single-file names under its prefix."""
    groups: dict[str, tuple[str, str, dict[int, tuple[str, Shape]]]] = {}
    problems = []
    for component in tables:
        for key, given in _canonical_names(component, shapes[component]).items():
            if component in TEXT_COMPONENTS and key == POSITION_IDS:
                continue
            try:
                name, kind, part = single_file_name(tables[component], key)
            except ConversionError as e:
                problems.append(f"{component}: {e}")
                continue
            name = prefixes[component] + name
            _, first_kind, parts = groups.setdefault(name, (component, kind, {}))
            if first_kind != kind or part in parts:
                problems.append(f"{name} claimed by {component} {key} and {[k for k, _ in parts.values()]}")
            parts[part] = (key, tuple(shapes[component][given]))
    ops = []
    for name, (component, kind, parts) in groups.items():
        if sorted(parts) != list(range(OP_KINDS[kind].parts)):
            problems.append(f"{name}: {kind} needs {OP_KINDS[kind].parts} diffusers tensors, found {parts}")
            continue
        keys, part_shapes = zip(*(parts[i] for i in range(len(parts))))
        try:
            ops.append(Op(component, kind, name, OP_KINDS[kind].single_file_shape(part_shapes), keys, part_shapes))
        except ConversionError as e:
            problems.append(f"{name}: {e}")
    if problems:
        raise ConversionError(f"no single-file plan for these diffusers tensors:\n{offenders(unexpected=problems)}")
    return ops


@functools.lru_cache(maxsize=4)
def _default_plan(layout: SingleFileLayout) -> tuple[Op, ...]:
    return tuple(single_file_plan(layout, diffusers_shapes(layout)))


# --- conversion -----------------------------------------------------------------------------------


def iter_single_file_to_diffusers(
    state: Mapping[str, np.ndarray], model: str | SingleFileLayout | None = None, *, shapes=None
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(component, diffusers state dict) for each component of a single-file state dict, strictly.

    state: single-file key -> array; may be lazy (each tensor is read once, when its component is
    built; key membership is taken from `state.keys()` only). model: "base", "refiner" or a
    `SingleFileLayout`; default: detected from the keys (and checked against them when given).
    Missing and unexpected tensors are reported before any is read, wrong shapes before the component's
    tensors are read; each component's dict is a lazy `ComponentState` (a tensor is read when asked for).
    Text-encoder keys come out `text_model.`-prefixed, as in the released diffusers files.
    """
    keys = set(state.keys())
    detected = detect_model(keys)
    layout = _layout(detected if model is None else model)
    if layout.model != detected:
        raise ConversionError(f"this is an SDXL {detected} single file, but a {layout.model} layout was given")
    plan = single_file_plan(layout, shapes)
    expected = {op.single_file for op in plan}
    what = f"SDXL {layout.model} single file does not match the model"
    check_tensors(what, dict.fromkeys(keys), dict.fromkeys(expected), ignorable_keys(layout.model))  # names only
    for component in layout.components:
        ops = [op for op in plan if op.component == component]
        notes = {op.single_file: f" (for {component} {', '.join(op.diffusers)})" for op in ops}
        want = {op.single_file: op.single_file_shape for op in ops}
        check_tensors(what, {op.single_file: shape_of(state, op.single_file) for op in ops}, want, notes=notes)
        yield component, ComponentState(state, ops)


def read_order(state, layout: SingleFileLayout) -> list[str]:
    """The single-file keys in the order `iter_single_file_to_diffusers` reads them: component by
    component, each in file order (`state.offset`), for reading ahead (`files.Prefetch`)."""
    plan = single_file_plan(layout)
    order = []
    for component in layout.components:
        keys = {op.single_file for op in plan if op.component == component}
        order += sorted(keys & set(state.keys()), key=state.offset)
    return order


class ComponentState(Mapping):
    """One component's diffusers state dict over a single-file state dict: each diffusers tensor is made
    from its single-file tensor (read then) when asked for, so a conversion holds one source tensor
    at a time. Shapes and dtypes are known without reading (`mapping.shape_of`)."""

    def __init__(self, state: Mapping[str, np.ndarray], ops: Sequence[Op]):
        self._state = state
        self._parts = {key: (op, i) for op in ops for i, key in enumerate(op.diffusers)}  # q, k, v adjacent
        # split ops read but not yet fully asked for: single-file key -> {diffusers key: part}. Loaders read
        # from several threads, so parts of two split ops interleave; each source is still read once.
        self._pending: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: str) -> np.ndarray:
        op, _ = self._parts[key]
        if len(op.diffusers) == 1:
            return op.forward(np.asarray(self._state[op.single_file]))[key]
        with self._lock:
            if op.single_file not in self._pending:
                self._pending[op.single_file] = dict(op.forward(np.asarray(self._state[op.single_file])))
            parts = self._pending[op.single_file]
            part = parts.pop(key) if key in parts else op.forward(np.asarray(self._state[op.single_file]))[key]
            if not parts:  # every part handed out: drop the source
                del self._pending[op.single_file]
            return part

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def shape(self, key: str) -> tuple[int, ...]:
        op, i = self._parts[key]
        return tuple(op.diffusers_shapes[i])

    def dtype(self, key: str) -> np.dtype:
        return dtype_of(self._state, self._parts[key][0].single_file)


def single_file_to_diffusers(
    state: Mapping[str, np.ndarray], model: str | SingleFileLayout | None = None, *, shapes=None
) -> dict[str, dict[str, np.ndarray]]:
    """Component -> diffusers state dict, from a single-file state dict (see `iter_single_file_to_diffusers`)."""
    return {c: dict(tensors) for c, tensors in iter_single_file_to_diffusers(state, model, shapes=shapes)}


def vae_file_to_diffusers(state: Mapping[str, np.ndarray], cfg: VAEConfig, prefix: str = "") -> "ComponentState":
    """The diffusers state dict of a VAE stored in the original (ldm / sgm) layout, strictly, for the VAE
    `cfg` describes (such a file records no architecture).

    state: a VAE-only file (Stability's `sdxl_vae.safetensors`: `encoder.down.0.block.0...`, `prefix` "")
    or any state dict holding one under `prefix` (a single file's `first_stage_model.`; its other tensors
    are not looked at). Missing, unexpected and mis-shaped tensors are reported before any is read; the
    result is lazy like `iter_single_file_to_diffusers`'.
    """
    shapes = torch_shapes(COMPONENTS["vae"].abstract_params(cfg), COMPONENTS["vae"].torch_key(cfg))
    ops = _plan({"vae": vae_names(cfg)}, {"vae": prefix}, {"vae": shapes})
    have = {key: shape_of(state, key) for key in state.keys() if key.startswith(prefix)}
    notes = {op.single_file: f" (for vae {', '.join(op.diffusers)})" for op in ops}
    want = {op.single_file: op.single_file_shape for op in ops}
    check_tensors("the VAE file does not match the model's VAE", have, want, notes=notes)
    return ComponentState(state, ops)


def diffusers_to_vae_file(state: Mapping[str, np.ndarray], cfg: VAEConfig) -> dict[str, np.ndarray]:
    """A VAE's state dict in the original (ldm / sgm) layout, unprefixed (Stability's `sdxl_vae.safetensors`),
    from its diffusers state dict: the exact inverse of `vae_file_to_diffusers` (the same ops, backward),
    every tensor checked against `cfg` first."""
    shapes = torch_shapes(COMPONENTS["vae"].abstract_params(cfg), COMPONENTS["vae"].torch_key(cfg))
    check_tensors("the VAE state dict does not match its config", {k: np.shape(v) for k, v in state.items()}, shapes)
    ops = _plan({"vae": vae_names(cfg)}, {"vae": ""}, {"vae": shapes})
    return {op.single_file: op.inverse([np.asarray(state[k]) for k in op.diffusers]) for op in ops}


def diffusers_to_single_file(
    components: Mapping[str, Mapping[str, np.ndarray]], model: str | SingleFileLayout, *, shapes=None
) -> dict[str, np.ndarray]:
    """The single-file state dict of per-component diffusers state dicts (the exact inverse of the import).

    Text-encoder dicts may be `text_model.`-prefixed or not; their `position_ids` buffers are ignored.
    The single file gets no ignorable buffers (`denoiser.sigmas`, `logit_scale`, `position_ids`).
    """
    layout = _layout(model)
    if set(components) != set(layout.components):
        raise ConversionError(f"an SDXL {layout.model} single file holds {layout.components}, got {sorted(components)}")
    plan = single_file_plan(layout, shapes)
    given = {c: _canonical_names(c, components[c].keys()) for c in layout.components}
    have = {f"{c}: {k}": np.shape(components[c][name]) for c, names in given.items() for k, name in names.items()}
    want = {f"{op.component}: {k}": shape for op in plan for k, shape in zip(op.diffusers, op.diffusers_shapes)}
    ignorable = {f"{c}: {POSITION_IDS}" for c in TEXT_COMPONENTS}
    check_tensors(f"diffusers state dicts do not match the SDXL {layout.model} model", have, want, ignorable)
    return {
        op.single_file: op.inverse([np.asarray(components[op.component][given[op.component][k]]) for k in op.diffusers])
        for op in plan
    }
