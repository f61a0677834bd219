"""UNet parity with diffusers' PyTorch UNets (fp32 CPU), config readers, paper parameter counts."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from latentdiff import forward_mode
from latentdiff.models.unet import (CONTEXT_KV, PREPARED, TIME_PROJ, UNet, UNetConfig, context_key_values, prepared_weights,
                                   time_projections)
from tests.torch_utils import flax_params_from_torch, nchw, nhwc, rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B, S = 2, 16


def _torch_model(cls, **kwargs):
    """A diffusers model with random weights, every parameter (incl. zero-init convs) perturbed."""
    torch.manual_seed(0)
    model = cls(sample_size=S, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(channels, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(B, S, S, channels).astype(np.float32), np.array([3, 742])


def _run(model, params, *args, **kwargs):
    return jax.jit(model.apply)({"params": params}, *args, **kwargs)


# ---- (a) UNet2DConditionModel ------------------------------------------------------------------

COND_LDM = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
# every level attends, per-level heads, 2 transformer layers, Dense projections, class labels
COND_VARIANT = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D",) * 2,
                    up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=16,
                    attention_head_dim=(2, 4), transformer_layers_per_block=2,
                    use_linear_projection=True, num_class_embeds=5, norm_num_groups=8)


@pytest.fixture(scope="module")
def cond_ldm():
    tm = _torch_model(diffusers.UNet2DConditionModel, **COND_LDM)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    x, t = _inputs(4)
    ctx = np.random.RandomState(1).randn(B, 5, 16).astype(np.float32)
    model = UNet(cfg)
    params = flax_params_from_torch(tm, model, x, t, ctx)
    with torch.no_grad():
        ref = tm(nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
    ref = nhwc(ref)
    return cfg, params, (x, t, ctx), ref


def test_condition_model_config(cond_ldm):
    cfg = cond_ldm[0]
    assert cfg.use_spatial_transformer and cfg.context_dim == 16 and cfg.num_heads == 2
    assert cfg.attention_resolutions == (1,) and cfg.channel_mult == (1, 2)
    assert cfg.num_res_blocks == 2 and not cfg.resblock_updown


def test_condition_model_parity(cond_ldm):
    cfg, params, args, ref = cond_ldm
    err = rel_err(_run(UNet(cfg), params, *args), ref)
    assert err <= 1e-4, err


@pytest.fixture(scope="module")
def cond_variant():
    tm = _torch_model(diffusers.UNet2DConditionModel, **COND_VARIANT)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    x, t = _inputs(4, seed=2)
    ctx = np.random.RandomState(3).randn(B, 7, 16).astype(np.float32)
    y = np.array([4, 1])
    model = UNet(cfg)
    params = flax_params_from_torch(tm, model, x, t, ctx, y=y)
    with torch.no_grad():
        ref = tm(nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                 class_labels=torch.from_numpy(y)).sample
    return model, params, (x, t, ctx, y), nhwc(ref)


def test_condition_model_variant_parity(cond_variant):
    model, params, (x, t, ctx, y), ref = cond_variant
    cfg = model.config
    assert cfg.num_heads == (2, 4) and cfg.transformer_depth == 2 and cfg.use_linear_projection
    assert params["class_embedding"]["embedding"].shape == (5, 128)
    err = rel_err(_run(model, params, x, t, ctx, y=y), ref)
    assert err <= 1e-4, err


def test_time_projections_computed_apart(cond_variant):
    """`time_projections` (what a sampling loop computes for all its steps before them): given back
    with the parameters, they replace the time and class embeddings and every ResBlock's projection
    (here zeroed, so a block that still projected would be wrong), and the output is torch's. A shared
    timestep's projections, one row, serve every row of x (and of the guided rows after them)."""
    model, params, (x, t, ctx, y), ref = cond_variant
    project = jax.jit(lambda p, t, y: time_projections(model, p, t, y))
    e = project(params, t, y)
    blocks = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)
              if re.search(r"time_emb_proj.*kernel", jax.tree_util.keystr(path))]
    assert len(jax.tree.leaves(e)) == len(blocks) > 2 and {a.shape[0] for a in jax.tree.leaves(e)} == {len(t)}
    assert TIME_PROJ not in jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx, y))  # init stores none
    timed = lambda path: re.search("time_emb|class_emb", jax.tree_util.keystr(path))  # noqa: E731
    dropped = jax.tree_util.tree_map_with_path(lambda path, a: jnp.zeros_like(a) if timed(path) else a, params)
    apply = jax.jit(model.apply)
    assert rel_err(apply({"params": dropped}, x, t, ctx, y), ref) > 1e-2  # the zeroed projections matter
    err = rel_err(apply({"params": dropped, TIME_PROJ: e}, x, t, ctx, y), ref)
    assert err <= 1e-4, err
    shared, same_y, ctx2 = np.full_like(t, t[1]), np.full_like(y, y[0]), np.concatenate([ctx, 0.5 * ctx])
    one = project(params, shared[:1], same_y[:1])
    full = apply({"params": params}, x, shared, ctx2, same_y)
    out = apply({"params": dropped, TIME_PROJ: one}, x, shared, ctx2, same_y)
    np.testing.assert_allclose(np.asarray(out), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_context_keys_and_values_projected_once(cond_variant):
    """`context_key_values` (what a sampling loop computes before its steps): given back with the
    parameters, it replaces the k/v projections of every cross-attention layer (here zeroed, so a
    layer that still projected would be wrong), and the output is torch's. They are stored for the
    padded context."""
    model, params, (x, t, ctx, y), ref = cond_variant
    kv = jax.jit(lambda p, c: context_key_values(model, p, c))(params, ctx)
    cross = lambda path, kinds: re.search(rf"attn2.*to_[{kinds}]", jax.tree_util.keystr(path))  # noqa: E731
    layers = [a.shape[-1] for path, a in jax.tree_util.tree_leaves_with_path(params) if cross(path, "k")]
    assert len(layers) == 2 * 7 and len(set(layers)) > 1  # 7 sites, 2 layers each, several widths
    assert sorted(a.shape[-1] for a in jax.tree.leaves(kv)) == sorted(2 * layers)
    padded = -(-ctx.shape[1] // 8) * 8  # stored for the context zero-padded to 8k tokens (masked by length)
    assert ctx.shape[1] % 8 and {a.shape[1] for a in jax.tree.leaves(kv)} == {padded}
    dropped = jax.tree_util.tree_map_with_path(lambda path, a: jnp.zeros_like(a) if cross(path, "kv") else a, params)
    assert "context_kv" not in jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx, y))  # init stores none
    assert rel_err(_run(model, dropped, x, t, ctx, y=y), ref) > 1e-2  # the zeroed projections matter
    out = jax.jit(model.apply)({"params": dropped, CONTEXT_KV: kv}, x, t, ctx, y=y)
    err = rel_err(out, ref)
    assert err <= 1e-4, err


def test_upsampling_kernels_prepared_once(cond_variant):
    """`prepared_weights` (what a sampling loop computes once, before its steps): given back with the
    parameters, each upsampler's per-phase kernels replace its own (here zeroed, so a layer that still
    folded its kernel would be wrong), and the output is torch's."""
    model, params, (x, t, ctx, y), ref = cond_variant
    prepared = jax.jit(lambda p: prepared_weights(model, p))(params)
    up = lambda path: re.search(r"upsamplers.*conv.*kernel", jax.tree_util.keystr(path))  # noqa: E731
    kernels = [a for path, a in jax.tree_util.tree_leaves_with_path(params) if up(path)]
    assert [a.shape for a in jax.tree.leaves(prepared)] == [(2, 2, k.shape[0], 2, 2, k.shape[-1]) for k in kernels]
    assert PREPARED not in jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx, y))  # init stores none
    dropped = jax.tree_util.tree_map_with_path(lambda path, a: jnp.zeros_like(a) if up(path) else a, params)
    assert rel_err(_run(model, dropped, x, t, ctx, y=y), ref) > 1e-2  # the zeroed kernels matter
    err = rel_err(jax.jit(model.apply)({"params": dropped, PREPARED: prepared}, x, t, ctx, y=y), ref)
    assert err <= 1e-4, err


# ---- (b) UNet2DModel: AttentionBlock, scale-shift norm, resblock up/down, class labels ----------

def test_unet2d_scale_shift_updown_class_parity():
    tm = _torch_model(diffusers.UNet2DModel, in_channels=3, out_channels=3,
                      block_out_channels=(32, 64, 96), layers_per_block=1,
                      down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D",
                                        "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
                      downsample_type="resnet", upsample_type="resnet",
                      resnet_time_scale_shift="scale_shift", attention_head_dim=16,
                      norm_num_groups=8, attn_norm_num_groups=8, num_class_embeds=10)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    assert cfg.use_scale_shift_norm and cfg.resblock_updown and cfg.num_classes == 10
    assert cfg.num_head_channels == 16 and cfg.attention_resolutions == (2, 4)
    assert not cfg.use_spatial_transformer
    x, t = _inputs(3)
    y = np.array([9, 0])
    model = UNet(cfg)
    params = flax_params_from_torch(tm, model, x, t, y=y)
    down = params["down_blocks_0"]["downsamplers_0"]  # a ResnetBlock2D with down=True
    assert set(down) == {"norm1", "conv1", "time_emb_proj", "norm2", "conv2"}
    assert down["time_emb_proj"]["kernel"].shape == (128, 64)  # scale and shift
    assert set(params["up_blocks_0"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v",
                                                          "to_out_0"}
    with torch.no_grad():
        ref = tm(nchw(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
    err = rel_err(_run(model, params, x, t, y=y), nhwc(ref))
    assert err <= 1e-4, err


# ---- (c) concat conditioning: 7 input channels, 3 output; one full-width head; scalar t --------

def test_unet2d_concat_channels_parity():
    tm = _torch_model(diffusers.UNet2DModel, in_channels=7, out_channels=3,
                      block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=None, norm_num_groups=8)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    assert cfg.num_heads == 1 and (cfg.in_channels, cfg.out_channels) == (7, 3)
    x, _ = _inputs(7, seed=4)
    model = UNet(cfg)
    params = flax_params_from_torch(tm, model, x, 0)
    with torch.no_grad():
        ref = tm(nchw(x), 250).sample
    out = _run(model, params, x, 250)
    assert out.shape == (B, S, S, 3)
    err = rel_err(out, nhwc(ref))
    assert err <= 1e-4, err


# ---- (d) the paper's models, abstractly -------------------------------------------------------

RELEASED = {
    "celebahq-ldm-vq-4": (dict(image_size=64, in_channels=3, out_channels=3, model_channels=224,
                               attention_resolutions=[8, 4, 2], num_res_blocks=2,
                               channel_mult=[1, 2, 3, 4], num_head_channels=32), 274.1e6),
    "cin-ldm-vq-f8": (dict(image_size=32, in_channels=4, out_channels=4, model_channels=256,
                           attention_resolutions=[4, 2, 1], num_res_blocks=2,
                           channel_mult=[1, 2, 4], num_head_channels=32,
                           use_spatial_transformer=True, transformer_depth=1, context_dim=512),
                      395.0e6),
    "cin256-v2": (dict(image_size=64, in_channels=3, out_channels=3, model_channels=192,
                       attention_resolutions=[8, 4, 2], num_res_blocks=2,
                       channel_mult=[1, 2, 3, 5], num_heads=1, use_spatial_transformer=True,
                       transformer_depth=1, context_dim=512), 400.9e6),
    "txt2img-1p4B": (dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                          attention_resolutions=[4, 2, 1], num_res_blocks=2,
                          channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                          transformer_depth=1, context_dim=1280, use_checkpoint=True,
                          legacy=False), 872.3e6),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_parameter_counts(name):
    params, want = RELEASED[name]
    cfg = UNetConfig.from_compvis(params)
    s = cfg.size_multiple
    x, t = jnp.zeros((1, s, s, cfg.in_channels)), jnp.zeros((1,))
    ctx = jnp.zeros((1, 1, cfg.context_dim)) if cfg.context_dim else None
    shapes = jax.eval_shape(lambda: UNet(cfg).init(jax.random.key(0), x, t, ctx))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes))
    assert abs(n - want) / want < 5e-3, (name, n)


def test_from_compvis_heads_and_remat():
    cfg = UNetConfig.from_compvis(RELEASED["txt2img-1p4B"][0])
    assert cfg.remat and [cfg.heads_at(i, cfg.level_channels(i)) for i in range(3)] == [
        (8, 40), (8, 80), (8, 160)]
    cfg = UNetConfig.from_compvis(RELEASED["cin256-v2"][0])
    assert cfg.heads_at(2, cfg.level_channels(2)) == (1, 576)


@pytest.mark.parametrize("bad", [dict(dims=3), dict(use_new_attention_order=True),
                                 dict(dropout=0.1), dict(disable_self_attentions=[True]),
                                 dict(num_heads=8), dict(num_res_blocks=[2, 2, 2, 2])])
def test_from_compvis_rejects(bad):
    with pytest.raises(ValueError):
        UNetConfig.from_compvis({**RELEASED["celebahq-ldm-vq-4"][0], **bad})


@pytest.mark.parametrize("bad", [
    dict(mid_block_type=None), dict(addition_embed_type="text"), dict(class_embed_type="timestep"),
    dict(only_cross_attention=True), dict(time_embedding_type="fourier"),
    dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
    dict(up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),  # asymmetric attention
    dict(layers_per_block=(1, 2)), dict(block_out_channels=(32, 48))])
def test_from_diffusers_condition_rejects(bad):
    with pytest.raises(ValueError):
        UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel", **COND_LDM, **bad})


def test_from_diffusers_unet2d_rejects():
    base = dict(_class_name="UNet2DModel", block_out_channels=(32, 64, 96),
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                attention_head_dim=16)
    UNetConfig.from_diffusers(base)
    for bad in (dict(downsample_type="resnet"),  # DownBlock2D still downsamples with a conv
                dict(resnet_time_scale_shift="scale_shift"),  # mid attention loses its GroupNorm
                dict(attention_head_dim=20), dict(mid_block_scale_factor=2.0),
                dict(time_embedding_type="fourier"),
                dict(down_block_types=("AttnSkipDownBlock2D", "AttnDownBlock2D", "DownBlock2D"))):
        with pytest.raises(ValueError):
            UNetConfig.from_diffusers({**base, **bad})


# ---- (e) bf16 compute, remat --------------------------------------------------------------------

def test_bf16_compute_close_to_fp32(cond_ldm):
    cfg, params, args, ref = cond_ldm
    out = _run(UNet(cfg, dtype=jnp.bfloat16), params, *args)
    assert out.dtype == jnp.float32  # the output head is float32; the body computes in bf16
    err = rel_err(np.asarray(out, np.float32), ref)
    assert err <= 2e-2, err


def test_remat_wraps_blocks_without_renaming(cond_ldm):
    cfg, params, (x, t, ctx), _ = cond_ldm
    model = UNet(dataclasses.replace(cfg, remat=True))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx))["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    remats = lambda m: len(re.findall(r"\bremat\w*\[", str(jax.make_jaxpr(
        lambda p: m.apply({"params": p}, x, t, ctx))(params))))
    plain = remats(UNet(cfg))
    assert plain == 12  # XLA's attention (the CPU's) recomputes its scores: 6 sites x (self, cross)
    assert remats(model) == plain + 12 + 6  # every ResBlock (2+2, 2, 3+3) and attention site (2, 1, 3)


def test_forward_mode_matches_torch_central_difference(cond_ldm):
    """jax.jvp through the UNet in `forward_mode` against the diffusers UNet's float64 central
    difference along the same direction of x and the context; and the adjoint identity
    <J v, w> = <v, J^T w> with reverse mode outside it (the norms' and gates' own VJPs)."""
    cfg, params, (x, t, ctx), _ = cond_ldm
    tm = _torch_model(diffusers.UNet2DConditionModel, **COND_LDM).double()
    model = UNet(cfg)
    rng = np.random.default_rng(5)
    vx, vc, w = rng.standard_normal(x.shape), rng.standard_normal(ctx.shape), rng.standard_normal(x.shape)
    f = lambda a, c: model.apply({"params": params}, a, jnp.asarray(t), c)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        with pytest.raises(TypeError, match="forward-mode"):  # the custom VJPs define no JVP
            jax.jvp(f, (jnp.asarray(x), jnp.asarray(ctx)), (jnp.asarray(vx), jnp.asarray(vc)))
        with forward_mode():
            _, tangent = jax.jvp(f, (jnp.asarray(x), jnp.asarray(ctx)),
                                 (jnp.asarray(vx, jnp.float32), jnp.asarray(vc, jnp.float32)))
        _, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(ctx))
        gx, gc = vjp(jnp.asarray(w, jnp.float32))
    eps = 1e-4
    with torch.no_grad():
        run = lambda s: tm(nchw(x).double() + s * nchw(vx), torch.from_numpy(t),  # noqa: E731
                           encoder_hidden_states=torch.from_numpy(ctx + s * vc)).sample
        ref = nhwc((run(eps) - run(-eps)) / (2 * eps))
    assert rel_err(np.asarray(tangent), ref) <= 1e-5, rel_err(np.asarray(tangent), ref)
    forward = float(np.sum(np.asarray(tangent, np.float64) * w))
    backward = float(np.sum(np.asarray(gx, np.float64) * vx) + np.sum(np.asarray(gc, np.float64) * vc))
    assert abs(forward - backward) <= 1e-4 * abs(forward), (forward, backward)


def test_forward_mode_takes_xla_attention(monkeypatch):
    """In `forward_mode`, attention takes XLA's path where cuDNN's (which has no forward mode) would
    be chosen."""
    from latentdiff.models import attention as att

    tried = []
    monkeypatch.setattr(att, "_cudnn_ok", lambda q: True)
    monkeypatch.setattr(att, "_cudnn_attention", lambda *args: tried.append(1))  # None: XLA's instead
    q = jnp.ones((1, 8, 2, 8))
    att.attention(q, q, q)
    with forward_mode():
        att.attention(q, q, q)
    assert tried == [1]


def test_call_errors(cond_ldm):
    cfg, params, (x, t, ctx), _ = cond_ldm
    model = UNet(cfg)
    with pytest.raises(ValueError, match="context"):
        model.apply({"params": params}, x, t)
    with pytest.raises(ValueError, match="divisible"):
        model.apply({"params": params}, x[:, :15, :15], t, ctx)


def test_padded_lengths_give_the_same_attention():
    """The cuDNN path pads 77 tokens to 80 (keys masked by length, extra query rows dropped), for
    cross-attention (77 keys) and LDMBert's self-attention (77 queries and keys): the same result."""
    from latentdiff.models.attention import pad_lengths

    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    for t in (16, 77):
        q = jax.random.normal(kq, (2, t, 2, 8))
        k = jax.random.normal(kk, (2, 77, 2, 8))
        v = jax.random.normal(kv, (2, 77, 2, 8))
        qp, kp, vp, lengths = pad_lengths(q, k, v)
        assert qp.shape[1] == (16 if t == 16 else 80) and kp.shape == vp.shape == (2, 80, 2, 8)
        assert lengths.tolist() == [77, 77]
        want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
        got = jax.nn.dot_product_attention(qp, kp, vp, key_value_seq_lengths=lengths, implementation="xla")
        np.testing.assert_allclose(np.asarray(got[:, :t]), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert pad_lengths(qp, kp, vp)[3] is None


def test_xla_attention_keeps_no_scores_for_the_backward_pass():
    """The XLA path (heads over 256 wide, or no cuDNN) saves q, k and v alone for its gradient and
    recomputes the (B, H, T, S) scores; the gradient is the plain attention's."""
    from jax._src.ad_checkpoint import saved_residuals

    from latentdiff.models.attention import attention

    q, k, v = (jax.random.normal(key, (2, 64, 1, 16)) for key in jax.random.split(jax.random.key(0), 3))
    loss = lambda *a: jnp.sum(jnp.sin(attention(*a, implementation="xla")))  # noqa: E731
    plain = lambda *a: jnp.sum(jnp.sin(jax.nn.dot_product_attention(*a, implementation="xla")))  # noqa: E731
    scores = lambda f: [r.shape for r, _ in saved_residuals(f, q, k, v) if r.shape[-2:] == (64, 64)]  # noqa: E731
    assert scores(plain) and not scores(loss), (scores(plain), scores(loss))
    for got, want in zip(jax.grad(loss, (0, 1, 2))(q, k, v), jax.grad(plain, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_gelu_matches_torch_exact_gelu():
    """layers.gelu (erf form, as torch) against torch's exact GELU, fp32 and bf16, with its gradient
    (in the far negative tail, where GELU is below 1e-6, erf's 1 + erf(x) loses its few digits)."""
    import torch

    from latentdiff.models.layers import gelu

    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.gelu(tx)
    ty.sum().backward()
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))), ty.detach().numpy(), rtol=1e-6, atol=2e-6)
    grad = jax.grad(lambda v: gelu(v).sum())(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), tx.grad.numpy(), rtol=1e-5, atol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = gelu(xb)
    assert yb.dtype == jnp.bfloat16
    ref = torch.nn.functional.gelu(torch.tensor(np.asarray(xb.astype(jnp.float32)))).numpy()
    np.testing.assert_allclose(np.asarray(yb.astype(jnp.float32)), ref, rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_layers_recast_fp32_kernels_in_the_backward_pass(kind):
    """Dense and Conv2D with float32 kernels and bf16 compute: same values and gradients as casting
    up front, but the backward pass keeps no bf16 copy of the kernel (it casts it again)."""
    from jax._src.ad_checkpoint import saved_residuals

    from latentdiff.models.layers import Conv2D, Dense

    module = Dense(24, dtype=jnp.bfloat16) if kind == "dense" else Conv2D(24, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16), jnp.bfloat16)
    params = module.init(jax.random.key(1), x)["params"]
    cast = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)

    def loss(p, h):  # h is differentiated too: its gradient is what needs the kernel
        return jnp.sum(jnp.square(module.apply({"params": p}, h).astype(jnp.float32)))

    grads, ref = jax.grad(loss, (0, 1))(params, x), jax.grad(loss, (0, 1))(cast, x)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), np.asarray(r.astype(jnp.float32)),
                                   rtol=1e-2, atol=1e-2)
    assert grads[0]["kernel"].dtype == jnp.float32
    kernel = params["kernel"]
    kept = [(a.shape, a.dtype) for a, why in saved_residuals(loss, params, x) if "argument" not in why]
    assert (kernel.shape, jnp.bfloat16) not in kept, kept
    kept_up_front = [(a.shape, a.dtype) for a, why in saved_residuals(lambda p, h: loss(
        jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p), h), params, x) if "argument" not in why]
    assert (kernel.shape, jnp.bfloat16) in kept_up_front, kept_up_front  # what the recast avoids


def test_upsampling_conv_matches_torch_nearest_then_conv():
    """Conv2D(upsample=True) (four 2x2 per-phase convolutions of x) against torch's nearest x2 then
    3x3 conv, values and gradients (fp32, odd sizes); its backward keeps nothing of the upsampled
    size (the two-step form kept the 4x larger upsampled input for the kernel's gradient)."""
    import torch
    from jax._src.ad_checkpoint import saved_residuals

    from latentdiff.models.layers import Conv2D

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    cot = rng.standard_normal((2, 6, 10, 7)).astype(np.float32)
    tconv = torch.nn.Conv2d(6, 7, 3, padding=1)
    tx = nchw(x).requires_grad_()
    ty = tconv(torch.nn.functional.interpolate(tx, scale_factor=2.0, mode="nearest"))
    ty.backward(nchw(cot))
    module = Conv2D(7, upsample=True)
    params = {"kernel": jnp.asarray(tconv.weight.detach().numpy().transpose(0, 2, 3, 1)),
              "bias": jnp.asarray(tconv.bias.detach().numpy())}
    with jax.default_matmul_precision("highest"):
        y, vjp = jax.vjp(lambda p, h: module.apply({"params": p}, h), params, jnp.asarray(x))
        gp, gx = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(np.asarray(y), nhwc(ty), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), nhwc(tx.grad), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gp["kernel"]), tconv.weight.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gp["bias"]), tconv.bias.grad.numpy(), rtol=1e-5, atol=1e-4)
    kept = [r.shape for r, _ in saved_residuals(lambda p, h: module.apply({"params": p}, h).sum(), params, x)]
    assert all(shape[1:3] != (6, 10) for shape in kept if len(shape) == 4), kept
    with pytest.raises(ValueError, match="3x3 convolution of stride 1"):
        Conv2D(7, stride=2, upsample=True).init(jax.random.key(0), jnp.asarray(x))


def test_geglu_and_its_gradient_match_torch():
    """layers.geglu (value * gelu(gate)) and its gradient against torch (fp32); in bf16 its
    backward keeps h alone."""
    import torch
    from jax._src.ad_checkpoint import saved_residuals

    from latentdiff.models.layers import geglu

    rng = np.random.default_rng(1)
    h = (rng.standard_normal((3, 7, 32)) * 2).astype(np.float32)
    cot = rng.standard_normal((3, 7, 16)).astype(np.float32)
    th = torch.tensor(h, requires_grad=True)
    value, gate = th.chunk(2, dim=-1)
    ty = value * torch.nn.functional.gelu(gate)
    ty.backward(torch.tensor(cot))
    y, vjp = jax.vjp(geglu, jnp.asarray(h))
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(cot))[0]), th.grad.numpy(), rtol=1e-5, atol=1e-5)
    res = saved_residuals(lambda a: geglu(a).astype(jnp.float32).sum(), jnp.asarray(h, jnp.bfloat16))
    assert [(r.shape, r.dtype) for r, _ in res] == [(h.shape, jnp.bfloat16)]


@pytest.mark.parametrize("silu", [False, True])
def test_norms_and_their_gradients_match_torch(silu):
    """group_norm (+ SiLU; with and without its per-(batch, channel) shift) and layer_norm, values
    and gradients for every input, against torch's (fp32); in bf16 their backward keeps only the
    bf16 input and per-group statistics."""
    import torch
    from jax._src.ad_checkpoint import saved_residuals

    from latentdiff.models.layers import group_norm, layer_norm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 6, 5, 64)) * 3 + 1).astype(np.float32)
    scale, bias = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    shift = (rng.standard_normal((2, 64)) * 2).astype(np.float32)
    cot = rng.standard_normal(x.shape).astype(np.float32)
    nchw = lambda a: a.permute(0, 3, 1, 2)  # noqa: E731
    cases = {
        "group": ((x, scale, bias), lambda a, s, b: group_norm(a, None, s, b, 8, 1e-5, silu, jnp.float32),
                  lambda a, s, b: torch.nn.functional.group_norm(nchw(a), 8, s, b, 1e-5).permute(0, 2, 3, 1)),
        "group+shift": ((x, shift, scale, bias),
                        lambda a, t, s, b: group_norm(a, t, s, b, 8, 1e-5, silu, jnp.float32),
                        lambda a, t, s, b: torch.nn.functional.group_norm(
                            nchw(a + t[:, None, None, :]), 8, s, b, 1e-5).permute(0, 2, 3, 1)),
        "layer": ((x, scale, bias), lambda a, s, b: layer_norm(a, s, b, 1e-5, jnp.float32),
                  lambda a, s, b: torch.nn.functional.layer_norm(a, (64,), s, b, 1e-5)),
    }
    for name, (inputs, ours, theirs) in cases.items():
        post = torch.nn.functional.silu if (silu and name != "layer") else (lambda v: v)
        tin = [torch.tensor(v, requires_grad=True) for v in inputs]
        ty = post(theirs(*tin))
        ty.backward(torch.tensor(cot))
        y, vjp = jax.vjp(ours, *map(jnp.asarray, inputs))
        np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
        grads = vjp(jnp.asarray(cot))
        assert len(grads) == len(tin)
        for got, want in zip(grads, tin):
            np.testing.assert_allclose(np.asarray(got), want.grad.numpy(), rtol=1e-4, atol=2e-4, err_msg=name)
        xb = jnp.asarray(x, jnp.bfloat16)
        rest = tuple(map(jnp.asarray, inputs[1:]))
        res = saved_residuals(lambda a: ours(a, *rest).astype(jnp.float32).sum(), xb)
        big = [(r.dtype, why) for r, why in res if r.size >= x.size]
        assert big == [(jnp.bfloat16, big[0][1])], (name, big)


def test_fsdp_gather_in_every_layer_and_none_kept_by_checkpointed_blocks(cond_ldm):
    """Under `layers.param_gather` (FSDP) every parameter passes through the gather exactly once,
    where its layer runs; with checkpointed blocks the backward pass re-gathers their weights
    instead of keeping the gathered (here: cast to bf16) copies, as gathering all up front did."""
    from jax._src.ad_checkpoint import saved_residuals

    from latentdiff.models.layers import param_gather

    cfg, params, (x, t, ctx), _ = cond_ldm
    model = UNet(dataclasses.replace(cfg, remat=True))
    seen = []

    def cast(tree):  # the FSDP gather without devices to gather over: the cast to the compute dtype
        return jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), tree)

    def record(tree):
        seen.extend(jax.tree_util.tree_leaves(tree))
        return cast(tree)

    with param_gather(record):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, t, ctx), params)
    leaves = jax.tree_util.tree_leaves(params)
    assert sorted(a.shape for a in seen) == sorted(a.shape for a in leaves)

    def per_layer(p):
        with param_gather(cast):
            return jnp.sum(model.apply({"params": p}, x, t, ctx) ** 2)

    def up_front(p):
        return jnp.sum(model.apply({"params": cast(p)}, x, t, ctx) ** 2)

    def kept_bf16_bytes(loss):
        return sum(a.size * 2 for a, _ in saved_residuals(loss, params) if a.dtype == jnp.bfloat16)

    weights = sum(a.size * 2 for a in leaves)
    assert kept_bf16_bytes(up_front) > 0.8 * weights  # the gathered weights kept for the backward pass
    assert kept_bf16_bytes(per_layer) < 0.2 * weights  # the layers outside the blocks only
    np.testing.assert_allclose(float(jax.jit(per_layer)(params)), float(jax.jit(up_front)(params)), rtol=1e-6)


def test_rows_shared_by_several_contexts_run_once_before_the_cross_attention(cond_ldm):
    """x of B rows with a context of 2B rows (guidance: each row's unconditional and conditional
    context side by side) gives what each row of x and t repeated in place gives, and the layers
    before the first cross-attention run on the B rows alone."""
    cfg, params, (x, t, ctx), _ = cond_ldm
    model = UNet(cfg)
    b = x.shape[0]
    ctx2 = np.concatenate([ctx, 0.5 * ctx[::-1]])
    shared, state = model.apply({"params": params}, x, t, ctx2, capture_intermediates=True,
                                mutable=["params", "intermediates"])  # params: as context_key_values
    full = model.apply({"params": params}, np.repeat(x, 2, axis=0), np.repeat(t, 2), ctx2)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(full), rtol=1e-5, atol=1e-5)
    rows = {"/".join(k): jax.tree.leaves(v)[0].shape[0] for k, v in traverse_util.flatten_dict(state["intermediates"]).items()
            if k[-1] == "__call__"}
    first = "down_blocks_0/attentions_0/transformer_blocks_0"
    assert rows["conv_in/__call__"] == rows["down_blocks_0/resnets_0/__call__"] == b
    assert rows[f"{first}/attn1/__call__"] == b and rows[f"{first}/attn2/__call__"] == 2 * b
    assert rows["conv_out/__call__"] == 2 * b
    with pytest.raises(ValueError, match="k \\* 2 rows"):
        model.apply({"params": params}, x, t, ctx2[:3])
    from latentdiff.pipeline import guided_model_fn
    with pytest.raises(ValueError, match="guidance needs a context"):
        guided_model_fn(model, params, None, 6.0)


SHARDED_GUIDANCE = """
import re, sys
import jax, jax.numpy as jnp, numpy as np
sys.path[:0] = ["benchmarks"]
import bench
from latentdiff.pipeline import guided_model_fn
spec = bench._txt2img_spec(True, jnp.float32)
unet, b = spec["unet"], 8
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
put = lambda a, *spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
params = put(bench._random_params(True, jnp.float32)["unet"])
x = put(jnp.ones((b, 8, 8, unet.config.in_channels)), "batch")
u, c = (put(jnp.full((b, 7, unet.config.context_dim), v), "batch") for v in (0.0, 1.0))
step = jax.jit(lambda p, u, c, x: guided_model_fn(unet, p, jnp.concatenate([u, c]), 6.0)(x, jnp.full((b,), 10)))
text = step.lower(params, u, c, x).compile().as_text()
print(len(jax.devices()), re.findall(r"(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)", text))
"""


def test_guidance_over_devices_moves_nothing_between_them():
    """Guided sampling with the batch split over 4 devices (as the pipeline splits it): each row's
    contexts sit beside it, so x, once for both contexts, never leaves its device (with the rows of
    [x, x] against [unconditional; conditional], the activations were gathered at the first
    cross-attention)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SHARDED_GUIDANCE], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "4 []", out.stdout


def test_residual_stream_written_once_where_nothing_differentiates(monkeypatch):
    """A transformer block's three residual sums pass an optimization barrier in inference (XLA
    otherwise recomputes them inside every reader); differentiated, they are plain additions: the
    training program is the one plain additions give."""
    from latentdiff.models import unet

    block = unet.TransformerBlock(heads=2, head_dim=8)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 16))
    params = block.init(jax.random.key(2), x, ctx)

    def programs():  # traced afresh (jit's cache would keep the first trace)
        f = lambda p, a: block.apply(p, a, ctx)  # noqa: E731
        grad = jax.grad(lambda p, a: jnp.sum(f(p, a) ** 2), argnums=(0, 1))
        return [jax.jit(g).lower(params, x).as_text() for g in (f, grad)]

    inference, training = programs()
    monkeypatch.setattr(unet, "residual", lambda a, b: a + b.astype(a.dtype))
    plain_inference, plain_training = programs()
    count = lambda text: text.count("optimization_barrier")  # noqa: E731 (also jax.checkpoint's)
    assert count(inference) == count(plain_inference) + 3
    assert training == plain_training
