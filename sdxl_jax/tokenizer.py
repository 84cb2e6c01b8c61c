"""Prompts -> CLIP token ids for SDXL's two text encoders, offline and exact.

Both encoders share OpenAI CLIP's byte-level BPE vocabulary (49,408 tokens), shipped with the package
in `assets/clip_tokenizer/` (rebuild it with `assets/clip_tokenizer/make_vocab.py`). A row is

    [SOT_ID, t_1 .. t_n, EOT_ID, pad, pad, ...]      77 ids, n <= 75

and the two encoders differ only in the padding after the first end token:

    pad="eot"   CLIP-L (text_encoder, OpenAI CLIP): pads with EOT_ID = 49407
    pad="zero"  bigG (text_encoder_2, OpenCLIP):    pads with 0 (the token '!')

`eot` is the index of the first end token (n + 1), the position each encoder pools.

Exactness: ids equal `open_clip.tokenize` (the tokenizer SDXL's bigG was trained with) for every
string, with one deliberate exception: open_clip turns the literal text '<start_of_text>' /
'<end_of_text>' inside a prompt into the special ids; here a prompt is always plain text, so it cannot
inject start/end tokens (and move the pooled position). To get there, text is cleaned exactly as
open_clip does (`clean_text`: ftfy, html unescape, whitespace, lowercase) and transformers'
`CLIPTokenizer` is used for the BPE only; its own normaliser, special-token matching and
pre-tokeniser regex are replaced, because each differs from open_clip on some inputs (see
`Tokenizer.__init__`). `ftfy` is therefore a runtime dependency.

Long prompts, two modes:

    mode="truncate"  ids [B, 77] int32, eot [B] int32. Tokens past 75 are dropped, with a warning
                     on the `sdxl_jax.tokenizer` logger naming the prompt and the dropped text.
    mode="chunked"   ids [B, C, 77] int32, eot [B, C] int32 (the convention of the popular SD web
                     UIs). The token stream is cut into 75-token chunks, each wrapped as a full row
                     [SOT, chunk, EOT, pad...]. Every prompt gets the same C (the longest prompt's
                     need, at least `min_chunks`, at most `max_chunks`); shorter prompts get empty
                     chunks [SOT, EOT, pad...]. Fix C with min_chunks == max_chunks for static shapes
                     under jit, or to match a negative prompt's batch.

Encoder-side contract for chunked ids (the same code serves truncate ids, where C = 1):

    flat_ids = ids.reshape(-1, 77); flat_eot = eot.reshape(-1)           # [B*C, 77], [B*C]
    hidden, pooled = encoder(flat_ids, flat_eot)                         # [B*C, 77, D], [B*C, P]
    context = hidden.reshape(B, -1, D)                                   # [B, C*77, D]
    pooled = pooled.reshape(B, -1, P)[:, 0]                              # [B, P]: first chunk's

Usage:

    from sdxl_jax.tokenizer import tokenize_pair
    tok = tokenize_pair(["a photo of a cat"])        # tok.ids_l, tok.ids_g: [1, 77]; tok.eot_l: [1]
"""

import functools
import html
import logging
import math
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)  # "sdxl_jax.tokenizer"

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
VOCAB_SIZE = 49408
SOT_ID = 49406  # '<|startoftext|>'
EOT_ID = 49407  # '<|endoftext|>'
CONTEXT_LENGTH = 77
CHUNK_LENGTH = CONTEXT_LENGTH - 2  # prompt tokens per row, between SOT and EOT
PAD_IDS = {"eot": EOT_ID, "zero": 0}
MODES = ("truncate", "chunked")

# open_clip's pre-tokeniser split (OpenAI's, minus its special-token alternatives; see module doc).
# Case-insensitive like open_clip's, which matters only for the contraction "'ſ" (long s).
_SPLIT_PATTERN = r"""(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class Tokens(NamedTuple):
    """One encoder's ids. truncate: ids [B, 77], eot [B]; chunked: ids [B, C, 77], eot [B, C]."""

    ids: np.ndarray  # int32
    eot: np.ndarray  # int32, index of the first EOT_ID in each row


class TokenPair(NamedTuple):
    """Both encoders' ids for one batch of prompts; shapes as in `Tokens` (eot_l == eot_g)."""

    ids_l: np.ndarray  # CLIP-L, padded with EOT_ID
    ids_g: np.ndarray  # bigG, padded with 0
    eot_l: np.ndarray
    eot_g: np.ndarray


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy.fix_text, html.unescape twice, collapse whitespace, lowercase.

    ftfy straightens curly quotes, maps full-width forms to ASCII, splits ligatures, repairs mojibake
    and drops control characters; transformers' CLIPTokenizer does none of that.
    """
    try:
        import ftfy
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("sdxl_jax.tokenizer needs ftfy to clean text as CLIP does: pip install ftfy") from e
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _as_prompt_list(prompts) -> list[str]:
    """A str (a batch of one) or a list/tuple of str -> list of str; anything else is a TypeError."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a str or a list/tuple of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}: {p!r:.80}")
    if not prompts:
        raise ValueError("prompts is empty: a batch needs at least one prompt")
    return list(prompts)


def _check_chunk_args(mode: str, max_chunks: int | None, min_chunks: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "truncate" and (max_chunks is not None or min_chunks != 1):
        raise ValueError("max_chunks/min_chunks apply to mode='chunked' only")
    if not isinstance(min_chunks, int) or min_chunks < 1:
        raise ValueError(f"min_chunks must be an int >= 1, got {min_chunks!r}")
    if max_chunks is not None and (not isinstance(max_chunks, int) or max_chunks < min_chunks):
        raise ValueError(f"max_chunks must be None or an int >= min_chunks={min_chunks}, got {max_chunks!r}")


def _rows(streams: list[list[int]], n_chunks: int, pad_id: int) -> Tokens:
    """Token streams (each <= n_chunks * 75 ids, no SOT/EOT) -> ids [B, C, 77], eot [B, C]."""
    ids = np.full((len(streams), n_chunks, CONTEXT_LENGTH), pad_id, np.int32)
    eot = np.empty((len(streams), n_chunks), np.int32)
    ids[:, :, 0] = SOT_ID
    for b, stream in enumerate(streams):
        for c in range(n_chunks):
            chunk = stream[c * CHUNK_LENGTH : (c + 1) * CHUNK_LENGTH]
            ids[b, c, 1 : 1 + len(chunk)] = chunk
            ids[b, c, 1 + len(chunk)] = EOT_ID
            eot[b, c] = 1 + len(chunk)
    return Tokens(ids, eot)


class Tokenizer:
    """CLIP BPE over the shipped vocabulary. Build once via `load_tokenizer()` (cached)."""

    def __init__(self, assets_dir: str | Path = ASSETS_DIR):
        from tokenizers import Regex, pre_tokenizers
        from transformers import CLIPTokenizer

        assets_dir = Path(assets_dir)
        missing = [n for n in ("vocab.json", "merges.txt") if not (assets_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CLIP tokenizer files {missing} not found in {assets_dir}; "
                "regenerate them with assets/clip_tokenizer/make_vocab.py"
            )
        hf = CLIPTokenizer.from_pretrained(str(assets_dir), local_files_only=True)
        specials = hf.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
        if len(hf) != VOCAB_SIZE or specials != [SOT_ID, EOT_ID]:
            raise ValueError(
                f"{assets_dir}: vocabulary of {len(hf)} tokens with start/end ids {specials}, "
                f"expected {VOCAB_SIZE} and {[SOT_ID, EOT_ID]}"
            )
        # Only the BPE model is used as transformers configures it; the stages around it are made
        # to match open_clip:
        backend = hf.backend_tokenizer
        # Its NFC + \s+ + Rust lowercase differs after open_clip's cleaning (e.g. NFC re-orders
        # combining marks that Python's lowercasing of 'İ' produced); `clean_text` does all of it.
        backend.normalizer = None
        # Its regex keeps '<|endoftext|>' in one piece, and its added-token matching turns that
        # text into EOT_ID; open_clip splits it as '<|', 'endoftext', '|>'.
        backend.encode_special_tokens = True
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # the split is done
            ]
        )
        self._backend = backend

    def encode(self, prompts: str | list[str]) -> list[list[int]]:
        """Prompts -> their full BPE id streams: no SOT/EOT, no truncation, no padding."""
        # One at a time, not `encode_batch`: its thread pool buys nothing for prompts and makes
        # `tokenizers` warn in every data-loader worker forked afterwards.
        return [self._backend.encode(clean_text(p), add_special_tokens=False).ids for p in _as_prompt_list(prompts)]

    def decode(self, ids: list[int]) -> str:
        """Ids (no specials) -> text, for messages. Lossy: cleaning lowercased it."""
        return self._backend.decode(ids, skip_special_tokens=False).replace("</w>", " ").strip()

    def _fit(self, streams: list[list[int]], mode: str, max_chunks: int | None, min_chunks: int):
        """Chunks per prompt C, and the streams cut to C * 75 ids, warning for each cut one."""
        if mode == "truncate":
            n_chunks = 1
        else:
            n_chunks = max(min_chunks, max(math.ceil(len(s) / CHUNK_LENGTH) for s in streams))
            n_chunks = n_chunks if max_chunks is None else min(n_chunks, max_chunks)
        limit = n_chunks * CHUNK_LENGTH
        for i, s in enumerate(streams):
            if len(s) > limit:
                where = "75 (one 77-id row)" if mode == "truncate" else f"{limit} ({n_chunks} chunks of 75)"
                hint = " Use mode='chunked' to keep them." if mode == "truncate" else ""
                logger.warning(
                    "prompt %d: %d tokens exceed the limit of %s; dropped the last %d: %r.%s",
                    i,
                    len(s),
                    where,
                    len(s) - limit,
                    self.decode(s[limit:])[:200],
                    hint,
                )
        return [s[:limit] for s in streams], n_chunks

    def tokenize(
        self,
        prompts: str | list[str],
        *,
        pad: str,
        mode: str = "truncate",
        max_chunks: int | None = None,
        min_chunks: int = 1,
    ) -> Tokens:
        """Prompts (B of them) -> one encoder's `Tokens`: ids [B, 77] and eot [B] (truncate), or
        ids [B, C, 77] and eot [B, C] (chunked). pad: "eot" (CLIP-L) or "zero" (bigG)."""
        (out,) = self._tokens(prompts, (pad,), mode, max_chunks, min_chunks)
        return out

    def tokenize_pair(
        self, prompts: str | list[str], *, mode: str = "truncate", max_chunks: int | None = None, min_chunks: int = 1
    ) -> TokenPair:
        """Prompts -> both encoders' ids from one encoding (truncation warned once); shapes as `tokenize`."""
        clip_l, big_g = self._tokens(prompts, ("eot", "zero"), mode, max_chunks, min_chunks)
        return TokenPair(ids_l=clip_l.ids, ids_g=big_g.ids, eot_l=clip_l.eot, eot_g=big_g.eot)

    def _tokens(self, prompts, pads: tuple[str, ...], mode: str, max_chunks: int | None, min_chunks: int):
        """One `Tokens` per padding convention in `pads`, sharing one encoding and one cut."""
        bad = [p for p in pads if p not in PAD_IDS]
        if bad:
            raise ValueError(f"pad must be one of {tuple(PAD_IDS)}, got {bad[0]!r}")
        _check_chunk_args(mode, max_chunks, min_chunks)
        streams, n_chunks = self._fit(self.encode(prompts), mode, max_chunks, min_chunks)
        outs = [_rows(streams, n_chunks, PAD_IDS[p]) for p in pads]
        if mode == "truncate":  # drop the chunk axis: [B, 1, 77] -> [B, 77]
            outs = [Tokens(o.ids[:, 0], o.eot[:, 0]) for o in outs]
        return outs


_LOAD_LOCK = threading.Lock()


@functools.cache
def _load() -> Tokenizer:
    return Tokenizer()


def load_tokenizer() -> Tokenizer:
    """The package's tokenizer, built once per process.

    Thread-safe: two threads importing transformers' lazy modules at once fail ("cannot import name
    'CLIPTokenizer'"), so the first load is serialised (data-loader decode threads hit this)."""
    with _LOAD_LOCK:
        return _load()


def tokenize(
    prompts: str | list[str], *, pad: str, mode: str = "truncate", max_chunks: int | None = None, min_chunks: int = 1
) -> Tokens:
    """`Tokenizer.tokenize` with the cached tokenizer."""
    return load_tokenizer().tokenize(prompts, pad=pad, mode=mode, max_chunks=max_chunks, min_chunks=min_chunks)


def tokenize_pair(
    prompts: str | list[str], *, mode: str = "truncate", max_chunks: int | None = None, min_chunks: int = 1
) -> TokenPair:
    """`Tokenizer.tokenize_pair` with the cached tokenizer."""
    return load_tokenizer().tokenize_pair(prompts, mode=mode, max_chunks=max_chunks, min_chunks=min_chunks)
