"""Memory traffic of compiled programs: XLA's own count where it has no loops (XLA:CPU and a deviceless
v5e chip through libtpu), every iteration of a scan counted where XLA counts one, nested scans
multiplied, the costlier branch of a cond, and a loop of unknown trip count reported."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdxl_jax.train.hlo_traffic import hlo_traffic, memory_traffic, shape_bytes

S = jax.ShapeDtypeStruct
X, W = S((256, 512), jnp.float32), S((512, 512), jnp.float32)  # a 0.5 MiB activation, a 1 MiB weight
PLATFORMS = ["cpu", "tpu"]


def compiled(platform: str, fn, *args):
    """`fn` compiled for XLA:CPU or for one deviceless v5e chip. On the TPU, memory-space assignment is
    off: it adds HBM<->VMEM `copy-start`/`copy-done` pairs that XLA counts with their tuple of buffers
    (read, write and the tuple: ~2x) and `memory_traffic` counts once, so the two would not be comparable."""
    if platform == "cpu":
        return jax.jit(fn).lower(*args).compile()
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[:1]
    replicated = NamedSharding(Mesh(np.array(devices), ("x",)), PartitionSpec())
    jitted = jax.jit(fn, in_shardings=(replicated,) * len(args), out_shardings=replicated)
    return jitted.lower(*args).compile(compiler_options={"xla_vf_vmem_memory_space_assignment": False})


def counts(platform: str, fn, *args) -> tuple[float, float]:
    """(memory_traffic, XLA's "bytes accessed") of `fn` compiled for `platform`."""
    program = compiled(platform, fn, *args)
    traffic = hlo_traffic(program.as_text())
    assert traffic.uncounted_loops == []
    analysis = program.cost_analysis()
    return traffic.bytes, (analysis[0] if isinstance(analysis, list) else analysis)["bytes accessed"]


@pytest.fixture(autouse=True)
def _libtpu_beside_other_processes(monkeypatch):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a planner run elsewhere may hold libtpu's lock


def step(x, w):
    return jnp.tanh(x @ w)


def layers(x, ws):
    return jax.lax.scan(lambda c, w: (step(c, w), None), x, ws)[0]


def test_shape_bytes_pad_tiles_and_count_hbm_only():
    assert shape_bytes("bf16[6,512,512]{2,1,0:T(8,128)(2,1)}") == 6 * 512 * 512 * 2
    assert shape_bytes("bf16[6,512,512]{2,1,0:T(8,128)(2,1)S(1)}") == 0  # in VMEM, on chip
    assert shape_bytes("(s32[]{:T(128)}, f32[256,512]{1,0:T(8,128)S(1)}, /*index=2*/pred[], u32[]{:S(2)})") == (
        4 + 1  # a tiled scalar counts as itself, as in XLA's count; the others are not in HBM
    )
    assert shape_bytes("f32[256,32]{1,0:T(8,128)}") == 256 * 128 * 4  # 32 lanes move as 128
    assert shape_bytes("f32[3,32]{0,1:T(8,128)}") == 32 * 128 * 4  # dimension 0 is the minor one here
    assert shape_bytes("bf16[2,77,64]{2,1,0:T(8,128)(2,1)}") == 2 * 80 * 128 * 2
    assert shape_bytes("f8e4m3fn[16]{0}") == 16 and shape_bytes("s4[10]") == 5 and shape_bytes("token[]") == 0
    assert shape_bytes("((f32[2], s64[3]), c64[1])") == 8 + 24 + 8


@pytest.mark.parametrize("platform", PLATFORMS)
def test_loop_free_program_matches_xla(platform):
    """Matmuls, a transcendental, elementwise ops: the same per-fusion convention, the same bytes."""

    def f(x, w1, w2):
        return jnp.tanh(x @ w1) @ w2 * 2.0 + 1.0

    mine, xla = counts(platform, f, X, W, S((512, 256), jnp.float32))
    assert mine == xla, (mine, xla)
    assert mine >= 256 * 512 * 4 + 512 * 512 * 4 + 512 * 256 * 4 + 256 * 256 * 4  # inputs once, output once


@pytest.mark.parametrize("platform", PLATFORMS)
def test_scan_counts_every_iteration(platform):
    """XLA counts the loop body once: mine(n) - xla(n) = (n - 1) body + n cond. Two lengths give the body
    (+ cond); the third relation checks it, up to the small things the conventions differ on: tuples (XLA
    counts their pointer tables) and scalars (the TPU pads each to 512 bytes) — a few hundred bytes."""
    runs = {n: counts(platform, layers, X, S((n, 512, 512), jnp.float32)) for n in (4, 8)}
    gap = {n: mine - xla for n, (mine, xla) in runs.items()}
    body = (gap[8] - gap[4]) / 4
    assert abs(gap[4] - 3 * body) < 8 * 1024, (gap, body)
    single, _ = counts(platform, step, X, W)
    assert single < body < 1.5 * single + 2 * 256 * 512 * 4  # the step, a weight slice and a carry copy at most
    assert gap[8] > 6 * single  # what XLA's own figure misses: 7 of the 8 iterations
    if platform == "cpu":  # XLA:CPU unrolls the same program op for op: its count is the ground truth
        for n, (mine, _) in runs.items():
            _, unrolled = counts(
                platform,
                lambda x, ws: jax.lax.scan(lambda c, w: (step(c, w), None), x, ws, unroll=True)[0],
                X,
                S((n, 512, 512), jnp.float32),
            )
            assert 0 <= mine - unrolled < 2 * 256 * 512 * 4 + 1024, (n, mine, unrolled)  # the carry copied in


@pytest.mark.parametrize("platform", PLATFORMS)
def test_nested_scans_multiply(platform):
    """3 x 4 nested iterations cost what 12 flat ones do, up to the outer loop's counter."""

    def repeat(x, w, n):
        return jax.lax.scan(lambda c, _: (step(c, w), None), x, length=n)[0]

    flat, _ = counts(platform, lambda x, w: repeat(x, w, 12), X, W)
    for outer, inner in ((3, 4), (4, 3)):
        nested, xla = counts(
            platform,
            lambda x, w, a=outer, b=inner: jax.lax.scan(lambda c, _: (repeat(c, w, b), None), x, length=a)[0],
            X,
            W,
        )
        assert abs(nested - flat) < 1024, (outer, inner, nested, flat)
        assert xla < nested / 5


@pytest.mark.parametrize("platform", PLATFORMS)
def test_cond_counts_its_costlier_branch(platform):
    heavy = lambda x, w: jnp.tanh(jnp.tanh(x @ w) @ w)
    mine, _ = counts(platform, lambda p, x, w: jax.lax.cond(p, heavy, lambda x, w: x * 2.0, x, w), S((), bool), X, W)
    alone, _ = counts(platform, heavy, X, W)
    assert alone <= mine < alone + 64  # the predicate read


def test_loop_of_unknown_trip_count_counts_once_and_warns():
    program = compiled(
        "cpu", lambda n, x, w: jax.lax.fori_loop(0, n, lambda i, c: step(c, w), x), S((), jnp.int32), X, W
    )
    text = program.as_text()
    assert '"known_trip_count"' not in text
    traffic = hlo_traffic(text)
    assert len(traffic.uncounted_loops) == 1
    with pytest.warns(UserWarning, match="unknown trip count"):
        assert memory_traffic(text) == traffic.bytes
    bounded = compiled("cpu", lambda x, w: jax.lax.fori_loop(0, 5, lambda i, c: step(c, w), x), X, W).as_text()
    assert re.search(r'"known_trip_count":\{"n":"5"\}', bounded)
    assert hlo_traffic(bounded).bytes - traffic.bytes > 4 * counts("cpu", step, X, W)[0]  # 5 iterations against 1


def test_pallas_kernel_attributes_spanning_lines():
    """A Pallas TPU kernel's custom call carries JSON with newlines in its attributes; the instruction
    must stay whole (a stray `}` line once ended the computation early). Scanning it 2 vs 4 times adds
    2 bodies, and each body moves at least the kernel's q, k, v and output."""
    from sdxl_jax.models.attention import ATTENTION_IMPLS

    qkv = S((1, 256, 2, 64), jnp.bfloat16)

    def attend(n):
        def f(q, k, v):
            step = lambda c, _: (ATTENTION_IMPLS["flash"](c, k, v, False), None)
            return jax.lax.scan(step, q, None, length=n)[0]

        text = compiled("tpu", f, qkv, qkv, qkv).as_text()
        assert 'custom_call_target="tpu_custom_call"' in text and '\n"xprof_metadata"' in text
        traffic = hlo_traffic(text)
        assert traffic.uncounted_loops == []
        return traffic.bytes

    two, four = attend(2), attend(4)
    assert (four - two) / 2 >= 4 * 256 * 2 * 128 * 2  # q, k, v, out: bf16, head width 64 padded to 128 lanes
