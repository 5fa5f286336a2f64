"""Tiny random Stable Diffusion folders in the real diffusers on-disk layout, for tests.

`make_folder` builds a diffusers UNet2DConditionModel, AutoencoderKL, transformers CLIPTextModel,
a CLIP tokenizer with a hand-made BPE vocabulary and a scheduler, and saves them with
`StableDiffusionPipeline.save_pretrained` (model_index.json and one folder per component), exactly
as a user's downloaded SD 1.x / 2.x folder is laid out. The "sd1" flavour mirrors SD 1.x
(conv projections, quick_gelu text encoder, PNDM scheduler, epsilon prediction, the old tokenizer
layout vocab.json + merges.txt); "sd2" mirrors SD 2.x (linear projections, heads per block,
upcast attention, gelu text encoder, DDIM with v-prediction, pad token "!").
"""
from __future__ import annotations

import json
import os

import numpy as np

from prdp_jax.prompts.registry import ANIMALS

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.!'"
WORDS = sorted({w for a in ANIMALS for w in ("a", "painting", "of", "photo", a)})


def tokenizer_files(words=WORDS) -> tuple[dict, list[str]]:
    """A CLIP-style BPE vocabulary: every character with and without '</w>', plus merges that build
    each of `words` left to right into one token."""
    vocab: dict[str, int] = {}
    for c in LETTERS:
        vocab.setdefault(c, len(vocab))
    for c in LETTERS:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for piece in pieces[1:]:
            merged = left + piece
            if merged not in vocab:
                merges.append(f"{left} {piece}")
                vocab[merged] = len(vocab)
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tokenizer(directory: str, pad_token: str = "<|endoftext|>") -> int:
    """Writes vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json (the
    layout of the SD 1.x/2.x tokenizer folders); returns the vocabulary size."""
    os.makedirs(directory, exist_ok=True)
    vocab, merges = tokenizer_files()
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    token = lambda t: {"content": t, "lstrip": False, "normalized": True, "rstrip": False,
                       "single_word": False}
    special = {"bos_token": token("<|startoftext|>"), "eos_token": token("<|endoftext|>"),
               "pad_token": pad_token, "unk_token": token("<|endoftext|>")}
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
                   "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": pad_token, "unk_token": "<|endoftext|>"}, f)
    return len(vocab)


UNET = {
    "sd1": dict(attention_head_dim=2, use_linear_projection=False,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


def randomize(module, seed: int, scale: float = 0.2):
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def make_folder(root: str, kind: str = "sd1", weights: str = "safetensors", seed: int = 0,
                sample_size: int = 8) -> str:
    """Saves a tiny random SD pipeline under `root`; returns `root`.

    Sizes: UNet channels (16, 32), cross-attention 16; VAE channels (8, 16) (downscale 2, 4 latent
    channels); text encoder width 16, 2 layers, 77 positions. Images are 2 * sample_size pixels.
    """
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = os.path.join(root, "_tokenizer_src")
    vocab_size = write_tokenizer(tok_dir, pad_token="<|endoftext|>" if kind == "sd1" else "!")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet = randomize(UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, cross_attention_dim=16, norm_num_groups=8, **UNET[kind]), seed)
    vae = randomize(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=2 * sample_size), seed + 1, 0.1)
    eos = tokenizer.eos_token_id
    text = randomize(CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77,
        hidden_act="quick_gelu" if kind == "sd1" else "gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=2 if kind == "sd1" else eos,
        pad_token_id=tokenizer.pad_token_id)), seed + 2)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  set_alpha_to_one=False, steps_offset=1)
    scheduler = (PNDMScheduler(skip_prk_steps=True, **common) if kind == "sd1" else
                 DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **common))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=weights == "safetensors")
    if weights == "bin":
        # transformers writes safetensors only; a .bin text encoder is a plain torch.save.
        te = os.path.join(root, "text_encoder")
        for name in os.listdir(te):
            if name.endswith(".safetensors"):
                os.remove(os.path.join(te, name))
        torch.save(text.state_dict(), os.path.join(te, "pytorch_model.bin"))
    out_tok = os.path.join(root, "tokenizer")
    if kind == "sd1":  # the SD 1.x repos' tokenizer layout: vocab.json + merges.txt, no tokenizer.json
        for name in os.listdir(out_tok):
            os.remove(os.path.join(out_tok, name))
        write_tokenizer(out_tok)
    for name in os.listdir(tok_dir):
        os.remove(os.path.join(tok_dir, name))
    os.rmdir(tok_dir)
    return root


def torch_models(root: str):
    """The folder's components as diffusers/transformers PyTorch models (the references)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    return (UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")).eval(),
            AutoencoderKL.from_pretrained(os.path.join(root, "vae")).eval(),
            CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder")).eval())


def rel_err(got, want) -> float:
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())
