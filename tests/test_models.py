"""Our Flax UNet and text encoder against diffusers / transformers on the same random weights.

The PyTorch state dicts load through `convert.state_dict_to_params`, so these tests also pin the
parameter naming to the published checkpoint layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prdp_jax.infra.errors import WeightsError
from prdp_jax.models.convert import params_to_state_dict, state_dict_to_params
from prdp_jax.models.text_encoder import TextEncoder
from prdp_jax.models.unet import UNet


def randomize(module, seed=0, scale=0.2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)
    return module.eval()


UNET_CASES = {
    "sd1-like": dict(attention_head_dim=4, use_linear_projection=False, layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sd2-like": dict(attention_head_dim=(2, 4), use_linear_projection=True, layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # diffusers' projection class embedding, fed with the mean text-context vector
    "class-projection": dict(attention_head_dim=4, layers_per_block=1, class_embed_type="projection",
                             projection_class_embeddings_input_dim=24,
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}


@pytest.mark.parametrize("case", sorted(UNET_CASES))
def test_unet_matches_diffusers(case):
    from diffusers import UNet2DConditionModel
    kw = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
              cross_attention_dim=24, norm_num_groups=8, **UNET_CASES[case])
    ref = randomize(UNet2DConditionModel(**kw))
    ours_kw = dict(kw)
    ours_kw["num_attention_heads"] = ours_kw.pop("attention_head_dim")
    ours_kw.pop("projection_class_embeddings_input_dim", None)
    ours = UNet(**ours_kw)
    abstract = jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.zeros((1, 16, 16, 4)),
                                                jnp.zeros((1,), jnp.int32), jnp.zeros((1, 5, 24))))
    params = state_dict_to_params(ref.state_dict(), abstract["params"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, 5, 24)).astype(np.float32)
    t = np.array([10, 981])
    got = np.asarray(jax.jit(ours.apply)({"params": params}, x, t, ctx))
    class_labels = torch.from_numpy(ctx.mean(1)) if "class_embed_type" in kw else None
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
                   class_labels=class_labels).sample.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # And back: our params export to exactly the reference state dict.
    exported = params_to_state_dict(params)
    sd = ref.state_dict()
    assert set(exported) == set(sd)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sd[k].numpy().reshape(v.shape))


@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", 49)])
def test_text_encoder_matches_transformers(act, eos):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=10, hidden_act=act)
    ref = randomize(CLIPTextModel(CLIPTextConfig(**cfg, eos_token_id=eos, bos_token_id=1,
                                                 pad_token_id=0)))
    ours = TextEncoder(**cfg, eos_token_id=eos)
    ids = np.array([[1, 5, 7, 9, 49, 0, 0, 0, 0, 0], [1, 3, 49, 0, 0, 0, 0, 0, 0, 0]])
    abstract = jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.zeros((1, 10), jnp.int32)))
    params = state_dict_to_params(ref.state_dict(), abstract["params"], prefix="text_model.")
    hidden, pooled = jax.jit(ours.apply)({"params": params}, ids)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids))
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-5)


def test_converter_names_missing_key_and_bad_shape():
    ours = TextEncoder(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=6)
    abstract = jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32)))
    sd = params_to_state_dict(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract["params"]))
    missing = {k: v for k, v in sd.items() if "fc1.weight" not in k}
    with pytest.raises(WeightsError, match=r"f\.bin: missing key 'encoder\.layers\.0\.mlp\.fc1\.weight'"
                                           r" \(expected shape \(16, 8\)\)"):
        state_dict_to_params(missing, abstract["params"], source="f.bin")
    bad = dict(sd, **{"final_layer_norm.weight": np.zeros(9, np.float32)})
    with pytest.raises(WeightsError, match=r"'final_layer_norm\.weight' has shape \(9,\), the config "
                                           r"expects \(8,\)"):
        state_dict_to_params(bad, abstract["params"], source="f.bin")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk", [0, 4, 6])
def test_attention_kernels_match_dot_product_attention(dtype, chunk):
    """The CPU matmul attention (its hand-written backward too) and query chunking give
    jax.nn.dot_product_attention's values and gradients."""
    from prdp_jax.models.attention import chunked_attention, matmul_attention
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 16, 2, 8)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 8)), dtype) for _ in range(2))
    cot = jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)
    kernel = (lambda q, k, v: chunked_attention(q, k, v, chunk)) if chunk else matmul_attention
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(kernel(q, k, v), np.float32),
                               np.asarray(jax.nn.dot_product_attention(q, k, v), np.float32),
                               atol=tol, rtol=tol)
    got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, atol=tol * np.abs(w).max(), rtol=tol)
