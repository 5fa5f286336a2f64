"""Tokenizers: a word-level one for closed vocabularies, and transformers' CLIP tokenizer.

Both map a list of strings to [N, max_length] int32 ids laid out as CLIP expects:
BOS, tokens..., EOS, then padding.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import numpy as np

from prdp_jax.infra.errors import PromptError, shorten

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of a caption."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Closed-vocabulary tokenizer: ids 0 = pad, 1 = EOS, 2 = BOS, then the sorted vocabulary.

    Use `eos_token_id=1` in the text encoder so it pools at the first EOS.
    """

    pad_id, eos_id, bos_id = 0, 1, 2
    first_word_id = 3

    def __init__(self, vocabulary: Iterable[str], max_length: int):
        self.vocab = sorted(set(vocabulary))
        self.ids = {w: i + self.first_word_id for i, w in enumerate(self.vocab)}
        self.max_length = int(max_length)

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], max_length: int | None = None) -> "WordTokenizer":
        vocab = {w for p in prompts for w in words(p)}
        longest = max((len(words(p)) for p in prompts), default=0) + 2
        return cls(vocab, max_length or longest)

    @classmethod
    def from_folder(cls, path: str) -> "WordTokenizer":
        """The tokenizer of a pipeline folder's tokenizer/ (vocab.json: {"words", "max_length"})."""
        import json

        from prdp_jax.infra.errors import WeightsError
        file = os.path.join(path, "vocab.json")
        try:
            with open(file) as f:
                spec = json.load(f)
            return cls(spec["words"], spec["max_length"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{file}: not a readable word vocabulary ({e})") from None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + self.first_word_id

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """[N] strings -> [N, max_length] int32 ids. Raises PromptError on unknown words."""
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        for row, prompt in enumerate(prompts):
            toks = words(prompt)
            unknown = [w for w in toks if w not in self.ids]
            if unknown:
                raise PromptError(f"prompt {shorten(prompt)}: unknown word {shorten(unknown[0], 40)} "
                                  f"(not in the tokenizer's {len(self.vocab)}-word vocabulary)")
            if len(toks) + 2 > self.max_length:
                raise PromptError(f"prompt {shorten(prompt)} has {len(toks)} words; at most "
                                  f"{self.max_length - 2} fit")
            ids = [self.bos_id] + [self.ids[w] for w in toks] + [self.eos_id]
            out[row, :len(ids)] = ids
        return out


class CLIPTokenizer:
    """transformers' `CLIPTokenizer` read from a folder (vocab.json, merges.txt, ...), padded and
    truncated to `max_length` ids: BOS, tokens..., EOS, then the tokenizer's pad token.

    Attributes:
      max_length: ids per prompt (the text encoder's max_position_embeddings, 77 for SD).
      vocab_size: the tokenizer's vocabulary size (added tokens included).
    """

    def __init__(self, path: str, max_length: int):
        from prdp_jax.infra.errors import WeightsError
        try:
            from transformers import CLIPTokenizer as HFCLIPTokenizer
        except ImportError:
            raise WeightsError(f"{path}: reading the CLIP tokenizer needs transformers "
                               f"(pip install transformers)") from None
        if not os.path.isdir(path):
            raise WeightsError(f"{path}: tokenizer folder not found")
        try:
            self._tokenizer = HFCLIPTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for bad folders
            raise WeightsError(f"{path}: not a readable CLIP tokenizer "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.max_length = int(max_length)
        self.vocab_size = len(self._tokenizer)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """[N] strings -> [N, max_length] int32 ids (longer prompts are truncated, as in diffusers)."""
        out = self._tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                              truncation=True, return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)
