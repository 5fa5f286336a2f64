"""CLIP image preprocessing in JAX: resize the shortest side (bicubic), centre crop, normalise.

It reproduces the reference processors on device, for a [B, H, W, 3] float batch in [0, 1]:

- The reference processors see 8-bit images (a PIL image, or DDPO's `(x * 255).round()` uint8
  batch), so the batch is first rounded to the 256 levels (`quantize_input`).
- Resize: the shortest side to `size`, the other to int(size * long / short) (transformers'
  `get_resize_output_image_size` and torchvision's `Resize(int)` agree), with Keys' bicubic kernel
  (a = -0.5) widened by the downscale factor (antialiasing) and weights renormalised at the
  borders: that is PIL's BICUBIC filter, and torch's `interpolate(mode='bicubic', antialias=True)`.
  `jax.image.resize(method='bicubic', antialias=True)` computes the same weights.
- PIL resamples an 8-bit image in fixed point: 22-bit integer coefficients, a horizontal pass
  rounded and clipped to 8 bits, then a vertical pass, rounded and clipped again (transformers'
  CLIPImageProcessor with the PIL backend, PickScore's and the aesthetic predictor's pipeline).
  `pil_rounding=True` computes exactly that: Pillow's coefficients, applied by float32 matmuls on
  8-bit slices of them, whose sums are exact integers, then PIL's rounding. The result equals
  Pillow's bit for bit. open_clip as HPSv2 ships it converts to a float tensor before resizing
  (ToTensor, then Resize): no rounding, no clipping (`pil_rounding=False`, which uses
  `jax.image.resize`; torchvision >= 0.17 antialiases tensors by default, older releases did not,
  a difference HPSv2's own scores inherit from whichever version ran them).
- Centre crop: transformers takes the offset (size - crop) // 2; torchvision rounds
  (size - crop) / 2 half to even (`crop_offset`). Equal for square inputs.
- Normalise: (x - mean) / std per channel.

The measured difference to the reference processors is in tests/test_reward_models.py and the
README.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """How a reward model's reference processor turns an image into its input.

    Attributes:
      size: the shortest side after resizing.
      crop: the centre crop's side (the model's image_size).
      mean, std: per-channel normalisation.
      quantize_input: round the [0, 1] input to 8-bit levels first.
      pil_rounding: round and clip to 8 bits after each resize pass (PIL) or not (float tensors).
      crop_offset: 'floor' (transformers) or 'round' (torchvision, half to even).
    """

    size: int = 224
    crop: int = 224
    mean: Sequence[float] = OPENAI_CLIP_MEAN
    std: Sequence[float] = OPENAI_CLIP_STD
    quantize_input: bool = True
    pil_rounding: bool = True
    crop_offset: str = "floor"

    def __post_init__(self):
        if self.crop > self.size:
            raise ValueError(f"crop {self.crop} larger than the resized shortest side {self.size}")
        if self.pil_rounding and not self.quantize_input:
            raise ValueError("pil_rounding resamples 8-bit images; it needs quantize_input=True")
        if self.crop_offset not in ("floor", "round"):
            raise ValueError(f"crop_offset must be 'floor' or 'round', got {self.crop_offset!r}")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing the shortest side to `size`."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def crop_offsets(self, height: int, width: int) -> tuple[int, int]:
        if self.crop_offset == "floor":
            return (height - self.crop) // 2, (width - self.crop) // 2
        return int(round((height - self.crop) / 2)), int(round((width - self.crop) / 2))

    def __call__(self, images: jax.Array) -> jax.Array:
        """images: [B, H, W, 3] float in [0, 1] -> [B, crop, crop, 3] float32 normalised."""
        chex.assert_rank(images, 4)
        x = images.astype(jnp.float32)
        if self.quantize_input:
            x = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)
        else:
            x = x * 255.0
        b, h, w, c = x.shape
        new_h, new_w = self.resized_shape(h, w)
        if self.pil_rounding:
            if new_w != w:
                x = _pil_resize_axis(x, 2, new_w)
            if new_h != h:
                x = _pil_resize_axis(x, 1, new_h)
        elif (new_h, new_w) != (h, w):
            x = jax.image.resize(x, (b, new_h, new_w, c), "bicubic", antialias=True)
        top, left = self.crop_offsets(new_h, new_w)
        x = x[:, top:top + self.crop, left:left + self.crop] / 255.0
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        return (x - mean) / std


# ---- Pillow's BICUBIC resampling of 8-bit images (libImaging/Resample.c), exactly ----

_PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, as Pillow defines it."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def pil_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point resampling matrix: [in_size, out_size] int64, each column the 22-bit
    integer weights (summing to about 2^22) of the input pixels feeding one output pixel."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    out = np.zeros((in_size, out_size), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        k = _bicubic((taps - center + 0.5) / filterscale)
        total = k.sum()
        if total != 0.0:
            k = k / total
        out[xmin:xmax, xx] = np.where(k < 0, np.trunc(k * (1 << _PRECISION_BITS) - 0.5),
                                      np.trunc(k * (1 << _PRECISION_BITS) + 0.5)).astype(np.int64)
    return out


def _pil_resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    """One Pillow resampling pass along `axis` of x ([B, H, W, C] float holding integers 0..255).

    The integer sum over taps of pixel * coefficient is split by 8-bit slices of the coefficients
    (c = c2 * 2^16 + c1 * 2^8 + c0, c1 and c0 in [0, 255]); each slice's sum of products is an
    integer below 2^24 for up to 256 taps (a 60x downscale), so float32 matmuls at HIGHEST
    precision compute it exactly, and int32 reassembles the sum and applies Pillow's rounding.
    """
    in_size = x.shape[axis]
    coeffs = pil_coefficients(in_size, out_size)
    taps = int((coeffs != 0).sum(0).max())
    if taps > 256:
        raise ValueError(f"a {in_size} -> {out_size} resize needs {taps} taps; at most 256 are exact")
    slices = [(coeffs >> s) & 255 if s < 16 else coeffs >> 16 for s in (0, 8, 16)]
    spec = "bhwc,hk->bkwc" if axis == 1 else "bhwc,wk->bhkc"
    total = jnp.zeros((), jnp.int32)
    for shift, part in zip((0, 8, 16), slices):
        partial = jnp.einsum(spec, x, jnp.asarray(part, jnp.float32),
                             precision=jax.lax.Precision.HIGHEST)
        total = total + (jnp.round(partial).astype(jnp.int32) << shift)
    rounded = (total + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS
    return jnp.clip(rounded, 0, 255).astype(jnp.float32)
