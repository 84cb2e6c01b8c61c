"""sdxl_jax.tokenizer: shipped vocabulary, ids against open_clip, padding conventions, long prompts.

The oracle is open_clip's `tokenizer.py` (test-only: `pip install --no-deps open-clip-torch ftfy
regex`). It is loaded from its file, because `import open_clip` runs the package's `__init__`, which
needs torchvision; the module itself needs only ftfy, regex, numpy and torch.
"""

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from sdxl_jax import tokenizer as tk

ASSETS = Path(tk.__file__).resolve().parent / "assets" / "clip_tokenizer"
LOGGER = "sdxl_jax.tokenizer"

PROMPTS = [
    "a photo of a cat",
    "",
    "   ",
    "\t\n  \r\n",
    "A Photo Of A CAT",
    "UPPER lower MiXeD 123abc abc123",
    "Café crème brûlée, naïve façade, Ångström",
    "東京の夜景、ネオンサイン",
    "一只可爱的猫，高清，杰作",
    "한국어 프롬프트 테스트",
    "Привет, мир! Съешь же ещё этих булок",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "ΟΔΟΣ Σίσυφος",
    "İstanbul ǅ ẞ",
    "🐱🔥✨ emoji 👩‍👩‍👧 🏳️‍🌈",
    "!!!???...,,,;;; --- ***",
    "(masterpiece:1.2), [best quality], {ultra-detailed}, <lora:foo:0.8>",
    "1024x1024 8k 35mm f/1.8 ISO-100 3.14159 -42",
    "it's a dog's life; we'll see, they're, I'd, you've, I'm, don't, IT'S",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;single&#39; &amp;amp; &nbsp;",
    "line one\nline two\ttabbed\r\nwindows\x0bvtab",
    "“curly quotes” and ‘single’ — em dash … ellipsis",
    "Ｆｕｌｌｗｉｄｔｈ ＡＳＣＩＩ！ ﬁne ﬂour",
    "mojibake: cafÃ© rÃ©sumÃ©",
    "e\u0301 vs é, zero\u200bwidth\u00a0nbsp",
    "\x00control\x07chars \x1b[31mred\x1b[0m",
    "snake_case_words kebab-case-words CamelCase",
    "http://example.com/path?q=1&x=2 user@mail.com #hashtag @handle",
    "<|startoftext|> <|endoftext|> tokens written out",
    "it'ſ İُ",  # open_clip's case-insensitive "'s"; Python-lowercased 'İ' before a combining mark
    "1girl, solo, long hair, looking at viewer, smile",
    "word " * 100,
    ", ".join(["highly detailed intricate digital painting"] * 20),
    "猫" * 40,
]


def _load_open_clip_tokenizer():
    """open_clip/tokenizer.py as a standalone module, or skip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip not installed: pip install --no-deps open-clip-torch")
    for dep in ("ftfy", "regex", "torch"):
        pytest.importorskip(dep)
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_oracle", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def oc():
    return _load_open_clip_tokenizer()


@pytest.fixture(scope="module")
def oc_ids(oc):
    """open_clip.tokenize(PROMPTS): [N, 77], zero padded (bigG's convention)."""
    return oc.tokenize(PROMPTS).numpy()


@pytest.fixture(scope="module")
def tok():
    return tk.load_tokenizer()


def _load_make_vocab():
    spec = importlib.util.spec_from_file_location("_make_vocab", ASSETS / "make_vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the shipped vocabulary -------------------------------------------------------------------


def test_shipped_files_equal_regeneration_from_open_clip_gz():
    make_vocab = _load_make_vocab()
    try:
        gz = make_vocab.open_clip_gz_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))
    for name, text in make_vocab.render(gz).items():
        assert (ASSETS / name).read_bytes() == text.encode("utf-8"), f"{name} differs from make_vocab.py's output"


def test_vocab_layout():
    vocab = json.loads((ASSETS / "vocab.json").read_text(encoding="utf-8"))
    merges = (ASSETS / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == tk.VOCAB_SIZE == 49408
    assert sorted(vocab.values()) == list(range(tk.VOCAB_SIZE))
    assert vocab["<|startoftext|>"] == tk.SOT_ID == 49406
    assert vocab["<|endoftext|>"] == tk.EOT_ID == 49407
    assert (vocab["!"], vocab["!</w>"], vocab["Ā"]) == (0, 256, 188)  # bigG's pad id 0 is '!'
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    for rank in (0, 1000, 48893):  # merge r creates token 512 + r
        assert vocab[merges[1 + rank].replace(" ", "")] == 512 + rank


# --- ids against open_clip --------------------------------------------------------------------


def test_prompt_list_covers_long_prompts(tok):
    lengths = [len(s) for s in tok.encode(PROMPTS)]
    assert len(PROMPTS) >= 30 and sum(n > 75 for n in lengths) >= 3 and lengths[1] == 0


def test_bigg_ids_equal_open_clip(oc_ids):
    out = tk.tokenize(PROMPTS, pad="zero")
    assert out.ids.dtype == np.int32 and out.ids.shape == (len(PROMPTS), 77)
    for i, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(out.ids[i], oc_ids[i], err_msg=repr(prompt))


def test_clip_l_ids_are_open_clip_padded_with_eot(oc_ids):
    eot = np.argmax(oc_ids == tk.EOT_ID, axis=1)
    expected = np.where(np.arange(77)[None] > eot[:, None], tk.EOT_ID, oc_ids)
    out = tk.tokenize(PROMPTS, pad="eot")
    np.testing.assert_array_equal(out.ids, expected)
    assert out.eot.dtype == np.int32
    np.testing.assert_array_equal(out.eot, eot)


def test_encode_equals_open_clip_encode(oc, tok):
    assert tok.encode(PROMPTS) == [oc._tokenizer.encode(p) for p in PROMPTS]


def test_literal_ids():
    out = tk.tokenize_pair(["a photo of a cat", "", "“Tom &amp; Jerry”", "猫"])
    body = [[320, 1125, 539, 320, 2368], [], [257, 2435, 261, 9164, 257], [163, 234, 360]]
    for i, b in enumerate(body):
        row = [49406, *b, 49407]
        assert out.ids_l[i].tolist() == row + [49407] * (77 - len(row))
        assert out.ids_g[i].tolist() == row + [0] * (77 - len(row))
    assert out.eot_l.tolist() == out.eot_g.tolist() == [6, 1, 6, 4]


def test_special_token_text_stays_plain_text(oc):
    # open_clip turns the literal '<end_of_text>' into EOT_ID (a prompt could move the pooled
    # position); here it is plain text: the same ids open_clip gives once the literal is broken up.
    ours = tk.tokenize(["<end_of_text>", "<start_of_text> x"], pad="zero")
    theirs = oc.tokenize(["< end_of_text >", "< start_of_text > x"]).numpy()
    np.testing.assert_array_equal(ours.ids, theirs)
    assert ours.eot.tolist() == [8, 9]


# --- long prompts -----------------------------------------------------------------------------


def test_truncation_keeps_75_tokens_and_warns_once_per_prompt(tok, caplog):
    prompts = ["short", "word " * 100, "a cat"]
    stream = tok.encode(prompts[1])[0]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = tk.tokenize_pair(prompts)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "prompt 1:" in message and f"dropped the last {len(stream) - 75}" in message
    assert out.ids_l[1].tolist() == [tk.SOT_ID, *stream[:75], tk.EOT_ID]
    assert out.eot_l[1] == out.eot_g[1] == 76


def test_no_warning_when_everything_fits(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tk.tokenize(["word " * 75], pad="eot")
        tk.tokenize(["word " * 200], pad="eot", mode="chunked")
    assert not [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("pad", ["eot", "zero"])
def test_chunked_rows(tok, pad):
    prompts = ["", "a cat", "word " * 75, "word " * 76, "word " * 160 + "the end"]
    streams = tok.encode(prompts)
    assert [len(s) for s in streams] == [0, 2, 75, 76, 162]
    out = tk.tokenize(prompts, pad=pad, mode="chunked")
    assert out.ids.shape == (5, 3, 77) and out.eot.shape == (5, 3) and out.ids.dtype == np.int32
    np.testing.assert_array_equal(out.ids[:, :, 0], tk.SOT_ID)
    for b, stream in enumerate(streams):
        inner = []
        for c in range(3):
            row, e = out.ids[b, c].tolist(), int(out.eot[b, c])
            assert row[e] == tk.EOT_ID and tk.EOT_ID not in row[1:e] and tk.SOT_ID not in row[1:]
            assert row[e + 1 :] == [tk.PAD_IDS[pad]] * (76 - e)
            inner += row[1:e]
        assert inner == stream
    assert out.eot.tolist() == [[1, 1, 1], [3, 1, 1], [76, 1, 1], [76, 2, 1], [76, 76, 13]]
    # The first chunk is exactly the truncated row, so the pooled vector is the usual one.
    first = tk.tokenize(prompts, pad=pad)
    np.testing.assert_array_equal(out.ids[:, 0], first.ids)
    np.testing.assert_array_equal(out.eot[:, 0], first.eot)


def test_chunk_count_bounds(tok, caplog):
    prompts = ["a cat", "word " * 160]
    assert tk.tokenize(prompts, pad="eot", mode="chunked", min_chunks=5).ids.shape == (2, 5, 77)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = tk.tokenize_pair(prompts, mode="chunked", max_chunks=2)
    assert out.ids_l.shape == out.ids_g.shape == (2, 2, 77)
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert "prompt 1:" in record.getMessage() and "dropped the last 10" in record.getMessage()
    assert out.ids_g[1, :, 1:76].ravel().tolist() == tok.encode(prompts[1])[0][:150]
    fixed = tk.tokenize(["a cat"], pad="zero", mode="chunked", min_chunks=3, max_chunks=3)
    assert fixed.ids.shape == (1, 3, 77) and fixed.eot.tolist() == [[3, 1, 1]]


# --- API --------------------------------------------------------------------------------------


def test_single_string_is_a_batch_of_one():
    np.testing.assert_array_equal(tk.tokenize("a cat", pad="eot").ids, tk.tokenize(["a cat"], pad="eot").ids)
    assert tk.tokenize(("a", "b"), pad="zero").ids.shape == (2, 77)


def test_pair_equals_single_encoder_calls():
    prompts = ["a photo of a cat", "word " * 90]
    for mode in ("truncate", "chunked"):
        pair = tk.tokenize_pair(prompts, mode=mode)
        clip_l, big_g = tk.tokenize(prompts, pad="eot", mode=mode), tk.tokenize(prompts, pad="zero", mode=mode)
        pairs = [(pair.ids_l, clip_l.ids), (pair.ids_g, big_g.ids), (pair.eot_l, clip_l.eot), (pair.eot_g, big_g.eot)]
        for got, want in pairs:
            np.testing.assert_array_equal(got, want)


def test_load_tokenizer_is_cached():
    assert tk.load_tokenizer() is tk.load_tokenizer()


@pytest.mark.parametrize(
    "bad, words",
    [
        (None, "got NoneType"),
        (3, "got int"),
        (b"a cat", "got bytes"),
        (["ok", None], "prompt 1 must be a str, got NoneType"),
        ([["nested"]], "prompt 0 must be a str, got list"),
        (np.array(["a"]), "got ndarray"),
    ],
)
def test_non_string_input_is_a_type_error(bad, words):
    with pytest.raises(TypeError, match=words):
        tk.tokenize(bad, pad="eot")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(prompts=[], pad="eot"), "empty"),
        (dict(prompts=["x"], pad="left"), "pad must be one of"),
        (dict(prompts=["x"], pad="eot", mode="split"), "mode must be one of"),
        (dict(prompts=["x"], pad="eot", max_chunks=2), "chunked' only"),
        (dict(prompts=["x"], pad="eot", mode="chunked", min_chunks=0), "min_chunks"),
        (dict(prompts=["x"], pad="eot", mode="chunked", min_chunks=3, max_chunks=2), "max_chunks"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        tk.tokenize(**kwargs)


def test_missing_assets_fail_loudly(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_vocab.py"):
        tk.Tokenizer(tmp_path)
