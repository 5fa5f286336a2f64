"""Metric and image output: a JSONL file, TensorBoard event files and captioned PNG grids.

Only process 0 writes; on other processes every method is a no-op. Files are written atomically
(`files.py`), so a crash never leaves a half-written PNG or JSON.
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Mapping, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from prdp_jax.infra.errors import OutputError
from prdp_jax.infra.files import atomic_save_image, atomic_write_bytes


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"epoch": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._add_scalars(row)
        self._tb.flush()
        # Strict JSON: a NaN or Inf is written as null and its key listed under "nonfinite".
        bad = sorted(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            row.update({k: None for k in bad}, nonfinite=bad)
        line = json.dumps(row, sort_keys=True, allow_nan=False) + "\n"
        try:
            with open(self.jsonl_path, "a") as f:
                f.write(line)
        except OSError as e:
            raise OutputError(f"cannot append to {self.jsonl_path} ({e.strerror or e})") from None

    def truncate_after(self, epoch: int) -> None:
        """Drops every row past `epoch` (on a start or resume: the state on disk holds `epoch`
        epochs), from metrics.jsonl and TensorBoard alike, so that each epoch appears once.

        TensorBoard's event files are append-only: they are replaced by one rebuilt from the
        rows kept."""
        if not self.enabled:
            return
        rows = []
        if os.path.exists(self.jsonl_path):
            with open(self.jsonl_path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            return
        kept = [r for r in rows if r["epoch"] <= epoch]
        atomic_write_bytes(self.jsonl_path,
                           "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
        self._tb.close()
        tb_dir = os.path.join(self.workdir, "tensorboard")
        for name in os.listdir(tb_dir):
            if name.startswith("events.out.tfevents."):
                os.remove(os.path.join(tb_dir, name))
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(tb_dir)
        for r in kept:
            self._add_scalars(r)
        self._tb.flush()

    def _add_scalars(self, row: Mapping) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch" \
                    and math.isfinite(v):
                self._tb.add_scalar(k, v, row["epoch"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "dtype"):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v


def image_grid(images: np.ndarray, captions: Sequence[str], columns: int, scale: int = 1,
               max_caption_lines: int = 8) -> Image.Image:
    """A grid of images, each with its caption wrapped below it.

    Args:
      images: [N, H, W, 3] float in [0, 1].
      captions: N strings; newlines start new lines, long lines wrap at word boundaries.
      columns: images per row.
      scale: nearest-neighbour upscaling of each image (small images stay legible).
      max_caption_lines: longer captions are cut to this many lines.
    """
    images = np.clip(np.round(np.asarray(images, np.float32) * 255), 0, 255).astype(np.uint8)
    n, h, w, _ = images.shape
    h, w = h * scale, w * scale
    cell_w = max(w, 144)
    max_chars = max(cell_w // 6 - 1, 8)
    wrapped = [[piece for line in cap.split("\n")
                for piece in (textwrap.wrap(line, max_chars) or [""])][:max_caption_lines]
               for cap in captions]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption_height = max(measure.multiline_textbbox((0, 0), "\n".join(lines))[3]
                         for lines in wrapped) + 4
    rows = -(-n // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (h + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, columns)
        tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
        x, y = c * cell_w, r * (h + caption_height)
        grid.paste(tile, (x, y))
        draw.text((x + 1, y + h + 1), "\n".join(lines), fill="black")
    return grid


def save_grid(path: str, images: np.ndarray, captions: Sequence[str], columns: int) -> None:
    """Writes `image_grid` as a PNG (small images upscaled to about 96 pixels); process 0 only."""
    if jax.process_index() != 0:
        return
    scale = max(1, 96 // images.shape[2])
    atomic_save_image(image_grid(images, captions, columns, scale=scale), path)


def save_reward_grid(path: str, images: np.ndarray, prompts: Sequence[str], rewards: np.ndarray,
                     *, per_prompt: int, rows: int, columns: int) -> None:
    """A grid of prompts (rows) by their images (columns), each captioned with its reward.

    Args:
      images: [k, H, W, 3] the leading prompts' images, `per_prompt` consecutive ones a prompt.
      rewards: [>= k] the reward of image g (of prompt g // per_prompt).
      rows, columns: at most this many prompts, and images of each.
    """
    cols = min(columns, per_prompt)
    rows = min(rows, images.shape[0] // per_prompt)
    keep = (np.arange(rows)[:, None] * per_prompt + np.arange(cols)[None]).reshape(-1)
    captions = [f"{prompts[g // per_prompt]}\nreward {rewards[g]:.3f}" for g in keep]
    save_grid(path, images[keep], captions, columns=cols)
