"""Prompt sets read from files the user downloads: txt, jsonl, json, csv/tsv and parquet.

Two ways to name one (in `prompts.train` or `eval.sets`):

- a preset (below), whose path is `config.prompts.files.<preset>`; the preset knows the field and
  whether to drop repeats;
- `file:PATH` or `file:PATH#FIELD`: any file (or a directory / glob of shards of one format), with
  the field from `#FIELD` or else `config.prompts.field`.

Formats, by extension: `.txt` one prompt per line (blank lines skipped); `.jsonl` one JSON string or
object per line; `.json` a list of strings or of objects; `.csv` / `.tsv` with a header row;
`.parquet` (needs pyarrow; only the prompt column is read, so image columns cost nothing). For
objects and tables, FIELD names the key/column (a `.csv` with one column needs none). Every host
must hold the same file.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import json
import os

import numpy as np

from prdp_jax.infra.errors import ConfigError, PromptError

FORMATS = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A published prompt file: where it comes from, the field holding the prompt, and how to use it.

    Attributes:
      source: where to download it and what it holds (shown in errors and the README).
      field: key or column of the prompt ("" for a list of strings).
      unique: drop repeated prompts (first occurrence kept): preference datasets repeat a prompt
        once per compared pair.
      sample: keep a fixed random sample of this many prompts (seed 0) of the unique prompts.
      base: another preset whose file this one reads (its path field is the base's).
    """

    source: str
    field: str = ""
    unique: bool = False
    sample: int = 0
    base: str = ""


HPD = "the HPDv2 dataset (Hugging Face datasets ymhao/HPDv2 = zhwang/HPDv2)"
PICKAPIC = ("Pick-a-Pic v1 (Hugging Face dataset yuvalkirstain/pickapic_v1, or the smaller "
            "yuvalkirstain/pickapic_v1_no_images)")

PRESETS = {
    "hpdv2_train": Preset(
        f"train.json of {HPD}: a JSON list of annotated image pairs "
        "{prompt, image_path, human_preference, ...}; about 645k pairs over ~104k unique prompts "
        "(the paper's 100K+ large-scale training prompts)", field="prompt", unique=True),
    "hpdv2_train_seen500": Preset(
        "a fixed sample of 500 of hpdv2_train's prompts (the paper's 'seen prompts' evaluation)",
        field="prompt", unique=True, sample=500, base="hpdv2_train"),
    "hpdv2_anime": Preset(f"benchmark/anime.json of {HPD}: a JSON list of 800 prompts "
                          "(the HPSv2 benchmark's 'Animation' style)"),
    "hpdv2_concept_art": Preset(f"benchmark/concept-art.json of {HPD}: a JSON list of 800 prompts"),
    "hpdv2_paintings": Preset(f"benchmark/paintings.json of {HPD}: a JSON list of 800 prompts"),
    "hpdv2_photo": Preset(f"benchmark/photo.json of {HPD}: a JSON list of 800 prompts"),
    "pickapic_v1_train": Preset(
        f"the train split of {PICKAPIC}: parquet shards data/train-*.parquet (a file, a folder or a "
        "glob), column 'caption'; one row per compared pair", field="caption", unique=True),
    "pickapic_v1_test": Preset(
        f"the test split of {PICKAPIC}: data/test-*.parquet (or the 500-row test_unique split), "
        "column 'caption'", field="caption", unique=True),
}


def expand(path: str) -> list[str]:
    """A file, a directory (its files of one supported format) or a glob -> sorted file list."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(FORMATS))
        exts = {os.path.splitext(f)[1] for f in files}
        if len(exts) > 1:
            raise ConfigError(f"prompt folder {path} mixes formats {sorted(exts)}; point at one file "
                              f"or a glob")
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise ConfigError(f"prompt file {path} not found (no file, folder or glob match)")
    for f in files:
        if not f.endswith(FORMATS):
            raise ConfigError(f"prompt file {f}: unknown format; use one of {', '.join(FORMATS)}")
    return files


def _record_prompt(record, field: str, where: str) -> str:
    if isinstance(record, str):
        if field:
            raise PromptError(f"{where}: a plain string, but field {field!r} was asked for")
        return record
    if isinstance(record, dict):
        if not field:
            raise PromptError(f"{where}: an object; name its prompt key (e.g. file:PATH#prompt or "
                              f"prompts.field); keys: {sorted(record)[:8]}")
        if field not in record:
            raise PromptError(f"{where}: no key {field!r}; keys: {sorted(record)[:8]}")
        value = record[field]
        if not isinstance(value, str):
            raise PromptError(f"{where}: {field!r} is {type(value).__name__}, not a string")
        return value
    raise PromptError(f"{where}: expected a string or an object, found {type(record).__name__}")


def _read_one(path: str, field: str) -> list[str]:
    ext = os.path.splitext(path)[1]
    try:
        if ext == ".parquet":
            return _read_parquet(path, field)
        with open(path, encoding="utf-8", newline="" if ext in (".csv", ".tsv") else None) as f:
            if ext == ".txt":
                return [line.strip() for line in f if line.strip()]
            if ext == ".jsonl":
                out = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise PromptError(f"{path} line {i}: not JSON ({e.msg})") from None
                        out.append(_record_prompt(record, field, f"{path} line {i}"))
                return out
            if ext == ".json":
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
                if isinstance(data, dict) and field and isinstance(data.get(field), list):
                    data = data[field]  # {"prompt": [...]} column-style JSON
                    field = ""
                if not isinstance(data, list):
                    raise PromptError(f"{path}: expected a JSON list of prompts or objects")
                return [_record_prompt(r, field, f"{path} item {i}") for i, r in enumerate(data)]
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            columns = reader.fieldnames or []
            column = field or (columns[0] if len(columns) == 1 else "")
            if column not in columns:
                raise PromptError(f"{path}: no column {column!r}; columns: {columns[:8]}"
                                  + ("" if field else " (name one with #FIELD or prompts.field)"))
            return [row[column] for row in reader]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt file {path} cannot be read ({e})") from None


def _read_parquet(path: str, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading parquet prompt files needs pyarrow "
                          f"(pip install pyarrow)") from None
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise PromptError(f"{path}: not a readable parquet file ({e})") from None
    if not field:
        strings = [n for n, t in zip(schema.names, schema.types) if str(t) in ("string", "large_string")]
        if len(strings) != 1:
            raise PromptError(f"{path}: name the prompt column (file:PATH#COLUMN or prompts.field); "
                              f"string columns: {strings[:8]}")
        field = strings[0]
    if field not in schema.names:
        raise PromptError(f"{path}: no column {field!r}; columns: {schema.names[:8]}")
    values = pq.read_table(path, columns=[field]).column(field).to_pylist()
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise PromptError(f"{path} row {bad[0]}: {field!r} is {type(values[bad[0]]).__name__}, "
                          f"not a string")
    return values


@functools.lru_cache(maxsize=16)
def _read_cached(files: tuple[str, ...], mtimes: tuple[float, ...], field: str) -> tuple[str, ...]:
    out: list[str] = []
    for f in files:
        out += _read_one(f, field)
    return tuple(p.strip() for p in out if p and p.strip())


def read_prompts(path: str, field: str = "", unique: bool = False, sample: int = 0) -> list[str]:
    """The prompts of a file (or shards); see the module docstring for formats.

    Args:
      field: key/column of the prompt ("" for plain strings or a one-column csv).
      unique: drop repeats, keeping first occurrences in order.
      sample: keep a fixed (seed 0) random sample of this many prompts, in file order.
    """
    files = tuple(expand(path))
    prompts = list(_read_cached(files, tuple(os.path.getmtime(f) for f in files), field))
    if unique:
        prompts = list(dict.fromkeys(prompts))
    if sample and len(prompts) > sample:
        keep = np.sort(np.random.default_rng(0).choice(len(prompts), sample, replace=False))
        prompts = [prompts[i] for i in keep]
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts")
    return prompts


def preset_path(name: str, config) -> str:
    preset = PRESETS[name]
    key = preset.base or name
    files = config.prompts.get("files") if config is not None and "prompts" in config else None
    path = files.get(key, "") if files is not None else ""
    if not path:
        raise ConfigError(f"prompt set {name!r} reads a file you download: set "
                          f"--config.prompts.files.{key}=PATH ({PRESETS[key].source})")
    return path


def load_preset(name: str, config) -> list[str]:
    preset = PRESETS[name]
    return read_prompts(preset_path(name, config), preset.field, preset.unique, preset.sample)


def load_spec(spec: str, config=None) -> list[str]:
    """'file:PATH' or 'file:PATH#FIELD' -> prompts (field default: config.prompts.field)."""
    path, _, field = spec[len("file:"):].partition("#")
    if not field and config is not None and "prompts" in config:
        field = config.prompts.get("field", "") or ""
    return read_prompts(path, field)
