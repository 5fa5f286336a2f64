"""CLIP tokenisation on the host, from a local tokenizer folder, with transformers' CLIPTokenizer.

`hf_ids` gives what transformers' CLIPProcessor gives (BOS, BPE tokens, EOS, truncated to the
context length keeping the final EOS, padded with the folder's pad token).

`open_clip_ids` gives what open_clip's `tokenize` gives (HPSv2 uses it); open_clip's tokenizer is
the same byte-level BPE as OpenAI CLIP's (same vocabulary, merges and ids, special tokens
`<start_of_text>` / `<end_of_text>` at the ids transformers calls `<|startoftext|>` /
`<|endoftext|>`). The differences, and how they are matched:
  - cleaning: open_clip runs `ftfy.fix_text` (when ftfy is installed; it is an open_clip
    dependency), then `html.unescape` twice, strips, and collapses whitespace, before
    lower-casing. We apply the same cleaning before transformers' tokenizer (which itself
    NFC-normalises, collapses whitespace and lower-cases). Without ftfy installed, mojibake
    repair and curly-quote straightening are skipped; plain prompts are unaffected.
  - truncation: both keep BOS, the first context_length - 2 tokens and EOS.
  - padding: open_clip pads with 0; transformers with its pad token. We zero every padded slot.
With causal attention and pooling at EOS, padding never changes an embedding; the ids are matched
anyway so that they equal open_clip's exactly.
"""
from __future__ import annotations

import html
import os
import re
from typing import Sequence

import numpy as np

from prdp_jax.infra.errors import ConfigError, WeightsError

TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def load_tokenizer(folder: str, *, field: str):
    """transformers' CLIPTokenizer from a local folder (vocab.json + merges.txt, or
    tokenizer.json). Raises ConfigError naming `field` when the folder or its files are missing."""
    if not folder:
        raise ConfigError(f"{field} is empty; set it to a CLIP tokenizer folder (vocab.json and "
                          f"merges.txt, e.g. a copy of openai/clip-vit-large-patch14)")
    if not os.path.isdir(folder):
        raise ConfigError(f"{field}={folder!r} is not a folder")
    if not any(all(os.path.isfile(os.path.join(folder, f)) for f in files)
               for files in TOKENIZER_FILES):
        raise ConfigError(f"{folder}: no CLIP tokenizer files (vocab.json and merges.txt, or "
                          f"tokenizer.json) (set {field})")
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        raise ConfigError("the CLIP rewards tokenise with transformers' CLIPTokenizer: "
                          "pip install transformers") from None
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad files
        raise WeightsError(f"{folder}: not a readable CLIP tokenizer ({type(e).__name__}: {e}) "
                           f"(set {field})") from None


def hf_ids(tokenizer, prompts: Sequence[str], context_length: int) -> np.ndarray:
    """[N] prompts -> [N, context_length] int32, as CLIPProcessor(text=..., truncation=True)."""
    out = tokenizer(list(prompts), padding="max_length", truncation=True,
                    max_length=context_length, return_tensors="np")
    return np.asarray(out["input_ids"], np.int32)


def open_clip_clean(text: str) -> str:
    """open_clip's basic_clean + whitespace_clean (lower-casing is left to the tokenizer)."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def open_clip_ids(tokenizer, prompts: Sequence[str], context_length: int = 77) -> np.ndarray:
    """[N] prompts -> [N, context_length] int32 equal to open_clip's tokenize(prompts)."""
    cleaned = [open_clip_clean(p) for p in prompts]
    out = tokenizer(cleaned, padding="max_length", truncation=True, max_length=context_length,
                    return_tensors="np")
    ids = np.asarray(out["input_ids"], np.int32)
    return np.where(np.asarray(out["attention_mask"]) > 0, ids, 0).astype(np.int32)
