"""The model rewards (PickScore, CLIPScore, aesthetic, HPSv2) against PyTorch on the same weights.

Fixtures, all tiny, random, and written in the published on-disk formats:
  - a transformers `CLIPModel` (vision: 32 px, patch 8, quick_gelu; text: gelu) saved with
    `save_pretrained` (model.safetensors + config.json), its CLIPImageProcessor's
    preprocessor_config.json (32 px), and a CLIP tokenizer built here: byte-level
    BPE vocab.json (256 byte symbols, their `</w>` forms, a few merges, then <|startoftext|> and
    <|endoftext|> last, as in OpenAI's vocabulary) and merges.txt;
  - the aesthetic head: a torch `nn.Sequential` with the improved-aesthetic-predictor layout
    (Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear) saved as `.pth`;
  - HPSv2: open_clip cannot be imported here (it imports torchvision, which does not load beside
    this torch build), so `OpenCLIPReference` below is a minimal PyTorch CLIP written from open_clip's
    published architecture (VisionTransformer: conv1 without bias, class_embedding,
    positional_embedding, ln_pre, ResidualAttentionBlocks of ln_1 -> nn.MultiheadAttention with the
    fused in_proj -> ln_2 -> mlp.c_fc/GELU/mlp.c_proj, ln_post on the class token, `@ proj`; text:
    token_embedding + positional_embedding, causal blocks, ln_final, pooled at argmax(ids),
    `@ text_projection`), whose state dict has open_clip's key names. It is saved as
    {'state_dict': ...} in a `.pt`, HPSv2's container layout (also as a bare 'module.'-prefixed dict
    and as safetensors), together with an open_clip model-config JSON for its tiny architecture.
    Its preprocessing reference is HPSv2's: float tensor, torch's antialiased bicubic resize (what
    torchvision's tensor Resize calls), torchvision's centre-crop offset, CLIP normalisation.
Tolerances: 1e-4 of the output scale in float32 (conftest sets matmul precision to highest).
"""
import json
import os
from collections import OrderedDict

import jax
import numpy as np
import pytest
import torch
from scipy import ndimage

from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError, WeightsError
from prdp_jax.models import open_clip
from prdp_jax.rewards import aesthetic, clip_tokenizer, clipscore, hpsv2, pickscore
from prdp_jax.rewards import combine as rewards
from prdp_jax.rewards.image_transform import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform

IMAGE = 32
MERGES = [("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>"),
          ("o", "f</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("r", "e")]
PROMPTS = ["a photo of a cat", "The dog", "A photo of the red dog on a sofa", "a cat"]


def byte_symbols():
    """OpenAI CLIP's (GPT-2's) printable stand-in for each of the 256 bytes, in vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = dict(zip(keep, keep)), 0
    for b in range(256):
        if b not in out:
            out[b] = 256 + extra
            extra += 1
    return [chr(out[b]) for b in keep] + [chr(out[b]) for b in range(256) if b not in keep]


def write_tokenizer(folder):
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return len(vocab)


def randomize(module, seed, scale=0.2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)
    return module.eval()


def smooth_images(n, height, width, seed, sigma):
    """Natural-looking test images: Gaussian-blurred noise stretched to [0, 1]."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.normal(size=(n, height, width, 3)), (0, sigma, sigma, 0))
    lo, hi = f.min(axis=(1, 2, 3), keepdims=True), f.max(axis=(1, 2, 3), keepdims=True)
    return ((f - lo) / (hi - lo)).astype(np.float32)


def to_uint8(images):
    return np.round(images * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel
    folder = str(tmp_path_factory.mktemp("clip"))
    vocab = write_tokenizer(folder)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(image_size=IMAGE, patch_size=8, hidden_size=48, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"),
        projection_dim=24, logit_scale_init_value=4.0)
    model = randomize(CLIPModel(cfg), 0)
    with torch.no_grad():
        model.logit_scale.fill_(4.2)
    model.save_pretrained(folder)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                          crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert os.path.isfile(os.path.join(folder, "preprocessor_config.json"))
    return folder, model


def hf_reference(model, folder, images, prompts):
    """transformers' own pipeline: CLIPImageProcessor (PIL backend) on the 8-bit images, the
    tokenizer with padding=True, get_image_features / get_text_features, normalised."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                      crop_size={"height": IMAGE, "width": IMAGE})
    pixels = processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
    tok = CLIPTokenizer.from_pretrained(folder)
    ids = tok(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**ids).pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return img, txt, pixels


def close(got, want, rel=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max()
    assert err <= rel * max(np.abs(want).max(), 1e-6), (err, np.abs(want).max())
    return err


# ---- preprocessing ----------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,sigma", [(64, 64, 3), (512, 512, 20), (96, 61, 4)])
def test_preprocessing_equals_clip_image_processor(height, width, sigma):
    """Our JAX resize/crop/normalise equals transformers' CLIPImageProcessor (PIL) bit for bit
    (up to float32 normalisation rounding), and HPSv2's float path equals torch's antialiased
    bicubic resize to 1e-5."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    images = smooth_images(2, height, width, seed=height, sigma=sigma)
    ref = CLIPImageProcessorPil()(images=list(to_uint8(images)), return_tensors="np")["pixel_values"]
    ours = np.asarray(jax.jit(ImageTransform())(images))
    assert ours.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), rtol=0, atol=2e-6)

    x = torch.from_numpy(np.round(images * 255) / 255).float().permute(0, 3, 1, 2)
    short = min(height, width)
    size = (int(224 * height / short), 224) if width <= height else (224, int(224 * width / short))
    x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True)
    top, left = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
    x = x[:, :, top:top + 224, left:left + 224]
    x = (x - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    hps = np.asarray(jax.jit(ImageTransform(pil_rounding=False, crop_offset="round"))(images))
    np.testing.assert_allclose(hps, x.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)


# ---- transformers CLIP: PickScore, CLIPScore ---------------------------------------------------

def test_pickscore_and_clipscore_match_transformers(clip_folder):
    folder, model = clip_folder
    images = smooth_images(4, 64, 64, seed=1, sigma=3)
    img, txt, _ = hf_reference(model, folder, images, PROMPTS)
    cos = (img * txt).sum(-1).numpy()
    want_pick = float(model.logit_scale.detach().exp()) * cos / 100

    pick = pickscore.build(folder)
    got, _ = pick(images, PROMPTS, [{}] * 4)
    err_pick = close(got, want_pick)
    clip_s = clipscore.build(folder)
    got, info = clip_s(images, PROMPTS, [{}] * 4)
    close(info["cos"], cos)
    close(got, 2.5 * np.maximum(cos, 0))
    print(f"pickscore max abs err {err_pick:.2e} (scale {np.abs(want_pick).max():.3f})")


def test_clip_embeddings_match_transformers(clip_folder):
    from prdp_jax.models import clip
    from prdp_jax.rewards.clip_tokenizer import hf_ids, load_tokenizer
    folder, model = clip_folder
    images = smooth_images(3, 40, 64, seed=2, sigma=4)
    img, txt, pixels = hf_reference(model, folder, images, PROMPTS)
    ours, params = clip.load_hf_clip(folder)
    ids = hf_ids(load_tokenizer(folder, field="f"), PROMPTS, 16)
    got_img, got_txt = jax.jit(ours.apply)({"params": params}, pixels.permute(0, 2, 3, 1).numpy(), ids)
    close(got_img, img.numpy())
    close(got_txt, txt.numpy())


# ---- aesthetic ----------------------------------------------------------------------------------

def aesthetic_mlp(dim):
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))


class AestheticReference(torch.nn.Module):
    """improved-aesthetic-predictor's MLP, keys `layers.{0,2,4,6,7}.{weight,bias}`."""

    def __init__(self, dim):
        super().__init__()
        self.layers = aesthetic_mlp(dim)

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_matches_pytorch(clip_folder, tmp_path):
    folder, model = clip_folder
    head = randomize(AestheticReference(24), 3, scale=0.1)
    mlp_path = str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save(head.state_dict(), mlp_path)
    assert sorted(head.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7)
                                               for p in ("weight", "bias"))
    images = smooth_images(4, 64, 64, seed=4, sigma=3)
    img, _, _ = hf_reference(model, folder, images, PROMPTS)
    with torch.no_grad():
        want = head(img)[:, 0].numpy()
    got, _ = aesthetic.build(folder, mlp_path)(images, PROMPTS, [{}] * 4)
    err = close(got, want)
    print(f"aesthetic max abs err {err:.2e} (scale {np.abs(want).max():.3f})")


# ---- HPSv2 (open_clip layout) -------------------------------------------------------------------

OC_ARCH = {"embed_dim": 24, "quick_gelu": False,
           "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 48, "head_width": 12,
                          "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 0, "width": 32, "heads": 4, "layers": 2}}


class ResidualAttentionBlock(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(OrderedDict(c_fc=torch.nn.Linear(width, 4 * width),
                                                   gelu=torch.nn.GELU(),
                                                   c_proj=torch.nn.Linear(4 * width, width)))

    def forward(self, x, mask=None):  # x: [L, B, D], sequence first as open_clip's blocks
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(torch.nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = torch.nn.ModuleList([ResidualAttentionBlock(width, heads)
                                              for _ in range(layers)])

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisualReference(torch.nn.Module):
    def __init__(self, image, patch, width, layers, heads, embed):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.zeros(width))
        self.positional_embedding = torch.nn.Parameter(torch.zeros((image // patch) ** 2 + 1, width))
        self.ln_pre = torch.nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Parameter(torch.zeros(width, embed))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenCLIPReference(torch.nn.Module):
    """open_clip's CLIP (ViT vision tower, built-in text tower), key for key."""

    def __init__(self, arch):
        super().__init__()
        v, t = arch["vision_cfg"], arch["text_cfg"]
        self.visual = VisualReference(v["image_size"], v["patch_size"], v["width"], v["layers"],
                                      v["width"] // v["head_width"], arch["embed_dim"])
        self.transformer = Transformer(t["width"], t["layers"], t["heads"])
        self.token_embedding = torch.nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = torch.nn.Parameter(torch.zeros(t["context_length"], t["width"]))
        self.ln_final = torch.nn.LayerNorm(t["width"])
        self.text_projection = torch.nn.Parameter(torch.zeros(t["width"], arch["embed_dim"]))
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
        n = t["context_length"]
        self.register_buffer("attn_mask", torch.full((n, n), float("-inf")).triu(1), persistent=False)

    def encode_image(self, pixels):
        x = self.visual(pixels)
        return x / x.norm(dim=-1, keepdim=True)

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.transformer(x.transpose(0, 1), self.attn_mask).transpose(0, 1)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection
        return x / x.norm(dim=-1, keepdim=True)


def hps_preprocess_reference(images):
    """HPSv2's val transform on the 8-bit image: ToTensor, Resize(IMAGE, bicubic; torchvision
    >= 0.17 antialiases tensors), CenterCrop(IMAGE), Normalize."""
    x = torch.from_numpy(to_uint8(images).astype(np.float32) / 255).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(IMAGE, IMAGE), mode="bicubic", antialias=True)
    return (x - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory, clip_folder):
    folder, _ = clip_folder
    out = tmp_path_factory.mktemp("hps")
    with open(os.path.join(folder, "vocab.json")) as f:
        vocab = len(json.load(f))
    arch = json.loads(json.dumps(OC_ARCH))
    arch["text_cfg"]["vocab_size"] = vocab
    arch_path = str(out / "ViT-tiny.json")
    with open(arch_path, "w") as f:
        json.dump(arch, f)
    ref = randomize(OpenCLIPReference(arch), 5)
    checkpoint = str(out / "HPS_v2_compressed.pt")
    torch.save({"state_dict": ref.state_dict()}, checkpoint)
    return dict(checkpoint=checkpoint, arch=arch_path, tokenizer=folder, ref=ref, out=out)


def test_hpsv2_matches_open_clip_reference(hps_files):
    ref = hps_files["ref"]
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in ref.state_dict()
    images = smooth_images(4, 64, 64, seed=6, sigma=3)
    tok = clip_tokenizer.load_tokenizer(hps_files["tokenizer"], field="f")
    ids = clip_tokenizer.open_clip_ids(tok, PROMPTS, 16)
    with torch.no_grad():
        img = ref.encode_image(hps_preprocess_reference(images))
        txt = ref.encode_text(torch.from_numpy(ids).long())
    want = (img * txt).sum(-1).numpy()
    reward = hpsv2.build(hps_files["checkpoint"], hps_files["tokenizer"], hps_files["arch"])
    got, _ = reward(images, PROMPTS, [{}] * 4)
    err = close(got, want)
    print(f"hpsv2 max abs err {err:.2e} (scale {np.abs(want).max():.3f})")

    # The model itself, on the reference's own pixels and ids.
    arch = open_clip.load_architecture(hps_files["arch"])
    model, params = open_clip.load_open_clip(hps_files["checkpoint"], arch)
    pixels = hps_preprocess_reference(images).permute(0, 2, 3, 1).numpy()
    got_img, got_txt = jax.jit(model.apply)({"params": params}, pixels, ids)
    close(got_img, img.numpy())
    close(got_txt, txt.numpy())

    # Other containers of the same weights load to the same params.
    from safetensors.torch import save_file
    bare = str(hps_files["out"] / "ddp.pth")
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, bare)
    st = str(hps_files["out"] / "hps.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, st)
    for path in (bare, st):
        _, other = open_clip.load_open_clip(path, arch)
        jax.tree.map(np.testing.assert_array_equal, other, params)


def test_open_clip_token_ids():
    """open_clip's tokenize: BOS, tokens, EOS, zeros; long prompts keep BOS + 14 tokens + EOS in
    16 slots; HTML entities are unescaped and whitespace collapsed before BPE."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        vocab = write_tokenizer(folder)
        tok = clip_tokenizer.load_tokenizer(folder, field="f")
    bos, eos = vocab - 2, vocab - 1
    ids = clip_tokenizer.open_clip_ids(tok, ["a cat", "x " * 40, "Tom &amp;amp;  Jerry", "Tom & jerry"], 16)
    assert ids.dtype == np.int32 and ids.shape == (4, 16)
    assert ids[0, 0] == bos and ids[0, 3] == eos and (ids[0, 4:] == 0).all()
    assert list(ids[0, :4]) == [bos, *tok.convert_tokens_to_ids(["a</w>", "cat</w>"]), eos]
    assert ids[1, 0] == bos and ids[1, 15] == eos and (ids[1, 1:15] != 0).all()
    np.testing.assert_array_equal(ids[2], ids[3])


# ---- bad input -----------------------------------------------------------------------------------

def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_paths_and_weights_are_one_line_errors(clip_folder, hps_files, tmp_path, monkeypatch):
    from safetensors.numpy import save_file
    folder, model = clip_folder
    config = lambda **kw: _config(**kw)
    with pytest.raises(ConfigError) as e:
        rewards.build("pickscore", config())
    assert "reward.pickscore.path" in one_line(e)
    with pytest.raises(ConfigError) as e:
        rewards.build("aesthetic", config(**{"reward.aesthetic.clip_path": folder}))
    assert "reward.aesthetic.mlp_path" in one_line(e)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(WeightsError) as e:
        rewards.build("clipscore", config(**{"reward.clipscore.path": missing}))
    assert missing in one_line(e) and "does not exist" in one_line(e) and "reward.clipscore.path" in one_line(e)
    # A PickScore folder with a config and tokenizer but no weights.
    empty = tmp_path / "PickScore_v1"
    empty.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        (empty / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    with pytest.raises(WeightsError) as e:
        rewards.build("pickscore", config(**{"reward.pickscore.path": str(empty)}))
    assert "no weights found" in one_line(e) and "model.safetensors" in one_line(e)
    # A truncated CLIP: a missing key names the file and the expected shape.
    state = {k: v.numpy() for k, v in model.state_dict().items()
             if k != "vision_model.post_layernorm.weight"}
    save_file(state, str(empty / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        rewards.build("pickscore", config(**{"reward.pickscore.path": str(empty)}))
    assert one_line(e) == (f"{empty}/model.safetensors: missing key "
                           f"'vision_model.post_layernorm.weight' (expected shape (48,))")
    # An aesthetic head for another CLIP (768-wide input) against this 24-wide one.
    wrong = str(tmp_path / "wrong.pth")
    torch.save(AestheticReference(768).state_dict(), wrong)
    with pytest.raises(WeightsError) as e:
        aesthetic.build(folder, wrong)
    assert one_line(e) == (f"{wrong}: key 'layers.0.weight' has shape (1024, 768), the config "
                           f"expects (1024, 24)")
    # HPSv2: a checkpoint of another width, a file that is no checkpoint, an unknown version.
    arch = json.load(open(hps_files["arch"]))
    arch["vision_cfg"]["width"] = 96
    arch["vision_cfg"]["head_width"] = 24
    with pytest.raises(WeightsError) as e:
        open_clip.load_open_clip(hps_files["checkpoint"], arch)
    assert one_line(e) == (f"{hps_files['checkpoint']}: key 'visual.class_embedding' has shape "
                           f"(48,), the architecture expects (96,)")
    junk = tmp_path / "HPS_v2.1_compressed.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError) as e:
        hpsv2.build(str(junk), hps_files["tokenizer"], hps_files["arch"])
    assert one_line(e).startswith(f"{junk}: not a readable PyTorch file")
    with pytest.raises(ConfigError) as e:
        rewards.build("hpsv2", config(**{"reward.hpsv2.version": "v3"}))
    assert "reward.hpsv2.version" in one_line(e)
    with pytest.raises(ConfigError) as e:
        hpsv2.build(hps_files["checkpoint"], str(tmp_path), hps_files["arch"])
    assert "reward.hpsv2.tokenizer_path" in one_line(e)
    # Without PyTorch, a .pth cannot be read: say so.
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(WeightsError) as e:
        aesthetic.build(folder, wrong)
    assert "needs PyTorch" in one_line(e)


def _config(**overrides):
    from prdp_jax.config import base_config
    from conftest import override
    return override(base_config(), **overrides)


# ---- sharding, combine, the trainer --------------------------------------------------------------

def test_reward_runs_sharded_on_8_devices_like_on_1(clip_folder):
    folder, _ = clip_folder
    reward = pickscore.build(folder)
    images = smooth_images(8, 64, 64, seed=7, sigma=3)
    prompts = PROMPTS * 2
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:8])
    batch = sharding.batch_sharding(mesh)
    sharded = sharding.put(images, batch)
    got8, _ = reward(sharded, prompts, [{}] * 8)
    assert got8.sharding.is_equivalent_to(batch, 1)
    got1, _ = reward(jax.device_put(images, jax.devices()[0]), prompts, [{}] * 8)
    assert len(got1.sharding.device_set) == 1
    np.testing.assert_allclose(np.asarray(got8), np.asarray(got1), rtol=1e-6, atol=1e-7)


def test_combine_on_device_and_mixed_with_host(clip_folder):
    folder, _ = clip_folder
    config = _config(**{"reward.pickscore.path": folder, "reward.clipscore.path": folder})
    images = smooth_images(4, 64, 64, seed=8, sigma=3)
    device_images = jax.device_put(images)
    both = rewards.combine({"pickscore": 10.0, "clipscore": 2.0}, config)
    assert both.on_device
    total, info = both(device_images, PROMPTS, [{}] * 4)
    assert isinstance(total, jax.Array)
    close(total, 10 * np.asarray(info["pickscore"]) + 2 * np.asarray(info["clipscore"]), 1e-6)
    mixed = rewards.combine({"pickscore": 1.0, "jpeg_compressibility": 0.5}, config)
    assert mixed.on_device
    total, info = mixed(device_images, PROMPTS, [{}] * 4)
    assert isinstance(total, np.ndarray) and total.shape == (4,)
    from prdp_jax.rewards.jpeg import jpeg_kilobytes
    np.testing.assert_allclose(info["jpeg_compressibility"], -jpeg_kilobytes(images))
    np.testing.assert_allclose(total, info["pickscore"] - 0.5 * jpeg_kilobytes(images), rtol=1e-6)


@pytest.mark.slow
def test_trainer_samples_with_on_device_reward(clip_folder):
    """The trainer's sampling hands its device images to a combined on-device + host reward."""
    from conftest import tiny_config
    from prdp_jax.pipelines.factory import build_pipeline
    from prdp_jax.prompts import sets as prompt_sets
    from prdp_jax.training import epoch as epoch_lib, state as state_lib
    folder, _ = clip_folder
    config = tiny_config(**{"reward.clipscore.path": folder,
                            "reward.weights": {"clipscore": 1.0, "jpeg_compressibility": 0.01}})
    mesh = sharding.mesh_from_config(config.mesh)
    pipe = build_pipeline(config, mesh)
    setup = epoch_lib.make_setup(config, pipe, mesh)
    state = setup.init_state(pipe.unet_params())
    reward = rewards.combine(dict(config.reward.weights), config)
    assert reward.on_device
    prompts = prompt_sets.PromptSampler(prompt_sets.load("animal_names"), 0).sample(4)
    sampled = epoch_lib.sample_and_reward(
        setup, state.params, pipe.frozen_params(), prompts,
        state_lib.epoch_key(state, 0, setup.shardings.replicated), reward, 0, False)
    value, info = sampled.rewards, sampled.reward_info
    assert value.shape == (16,) and np.isfinite(value).all()
    assert ((0 <= info["clipscore"]) & (info["clipscore"] <= 2.5)).all()
    np.testing.assert_allclose(value, info["clipscore"] + 0.01 * info["jpeg_compressibility"],
                               rtol=1e-5, atol=1e-6)
