"""Captions: sidecar text -> alternatives; per example one is picked, maybe tag-shuffled, maybe dropped.

    parse_captions(raw)     bytes | str | list -> (list of captions, repairs)
    pick_caption(...)       (text, drop_text) for one example, from a seeded rng

A sidecar `.txt` holds one caption per non-empty line (several lines = several alternative
captions, one picked at random per example). Text that is not UTF-8 is decoded as Windows-1252
(the usual culprit), with undecodable bytes replaced, and reported as repaired. Whitespace is
collapsed; the tokenizer lowercases and truncates (75 tokens) on its own.

Caption dropout marks the example `drop_text=True`: the trainer zeroes its text conditioning
(`conditioning.drop_text`), which is also what an image without any caption trains as when
`empty_caption="uncond"`.
"""

import numpy as np

EMPTY_CAPTION_POLICIES = ("uncond", "skip")  # keep as an unconditional example, or skip the record


def _decode(raw: bytes) -> tuple[str, bool]:
    """(text, repaired) from bytes: UTF-8 (BOM dropped), else Windows-1252 with replacement."""
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace"), True


def parse_captions(raw: bytes | str | list | tuple | None) -> tuple[list[str], list[str]]:
    """A caption source -> (non-empty captions, repair notes such as "caption_not_utf8").

    bytes/str: one caption per non-empty line. list/tuple (metadata.jsonl `text` lists, TFDS sequence
    features): one caption per item, items themselves may be bytes.
    """
    repairs = []
    if raw is None:
        return [], repairs
    items = list(raw) if isinstance(raw, (list, tuple, np.ndarray)) else [raw]
    captions = []
    for item in items:
        if isinstance(item, (bytes, np.bytes_)):
            item, repaired = _decode(bytes(item))
            if repaired and "caption_not_utf8" not in repairs:
                repairs.append("caption_not_utf8")
        if not isinstance(item, str):
            raise TypeError(f"a caption must be text, got {type(item).__name__}")
        lines = item.splitlines() if len(items) == 1 else [item]
        captions += [" ".join(line.split()) for line in lines if line.strip()]
    return captions, repairs


def shuffle_tags(text: str, rng: np.random.Generator, keep_first: int) -> str:
    """Shuffle comma-separated tags, keeping the first `keep_first` in place (e.g. a trigger word)."""
    tags = [t.strip() for t in text.split(",")]
    tags = [t for t in tags if t]
    head, tail = tags[:keep_first], tags[keep_first:]
    order = rng.permutation(len(tail))
    return ", ".join(head + [tail[i] for i in order])


def pick_caption(
    captions: list[str], rng: np.random.Generator, dropout: float, shuffle: bool, keep_tags: int
) -> tuple[str, bool]:
    """(text, drop_text) for one example. Draws in a fixed order: choice, dropout, shuffle.

    No caption at all gives ("", True): an unconditional example.
    """
    if not captions:
        return "", True
    text = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
    drop = bool(dropout > 0 and rng.random() < dropout)
    if drop:
        return "", True
    if shuffle:
        text = shuffle_tags(text, rng, keep_tags)
    return text, False
