"""The LDM denoising UNet (CompVis `openaimodel.UNetModel`), in Flax.

`UNetConfig` speaks the paper's openaimodel terms; `from_compvis` reads a YAML `unet_config.params`
and `from_diffusers` a diffusers `UNet2DConditionModel` / `UNet2DModel` config. Parameter paths are
diffusers' state-dict names with list indices folded in (`down_blocks.0.resnets.1` ->
`down_blocks_0/resnets_1`), so `latentdiff.convert.torch_names.convert_state_dict` loads diffusers
checkpoints by rule. Activations are NHWC.
"""
import dataclasses
from typing import Any, Optional, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from latentdiff.models.attention import key_values, multihead, pad_length
from latentdiff.models.geglu_gemm import gated_projection
from latentdiff.models.layers import (PREPARED, Dense, GroupNorm, LayerNorm, gathering, avg_pool2, computed_once, conv,
                                      dense, residual, timestep_embedding, upsample_nearest)

Dtype = Any


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """openaimodel `UNetModel` hyper-parameters.

    `attention_resolutions` are downsampling factors ds (level i has ds = 2**i). Exactly one of
    `num_heads` / `num_head_channels` is set; a site with `ch` channels has
    `heads = num_heads if num_head_channels == -1 else ch // num_head_channels` and
    `head_dim = ch // heads`. `num_heads` may be a per-level tuple (diffusers configs); the middle
    block uses the last level's value.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: Tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: Tuple[int, ...]
    num_heads: Union[int, Tuple[int, ...]] = -1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: Optional[int] = None
    use_linear_projection: bool = False  # SpatialTransformer proj_in/out as Dense (SD2 style)
    num_classes: Optional[int] = None
    mid_attention: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    remat: bool = False

    def __post_init__(self):
        for f in ("channel_mult", "attention_resolutions"):
            object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))
        if not isinstance(self.num_heads, int):
            object.__setattr__(self, "num_heads", tuple(int(v) for v in self.num_heads))
            if len(self.num_heads) != len(self.channel_mult):
                raise ValueError(f"num_heads {self.num_heads} needs one entry per level "
                                 f"({len(self.channel_mult)})")
        heads_set = self.num_heads != -1
        if heads_set == (self.num_head_channels != -1):
            raise ValueError("set exactly one of num_heads and num_head_channels "
                             f"(got {self.num_heads}, {self.num_head_channels})")
        if not self.channel_mult:
            raise ValueError("channel_mult must not be empty")
        if self.use_spatial_transformer and self.transformer_depth < 1:
            raise ValueError("transformer_depth must be >= 1")
        for level in range(self.levels):
            if self.level_channels(level) % self.norm_num_groups:
                raise ValueError(f"{self.level_channels(level)} channels not divisible by "
                                 f"{self.norm_num_groups} groups")
        for level in self.attention_levels() + ((self.levels - 1,) if self.mid_attention else ()):
            ch = self.level_channels(level)
            heads, _ = self.heads_at(level, ch)
            if heads < 1 or ch // heads < 1:
                raise ValueError(f"{ch} channels at level {level} cannot be split into heads "
                                 f"(num_heads={self.num_heads}, "
                                 f"num_head_channels={self.num_head_channels})")

    @property
    def levels(self):
        return len(self.channel_mult)

    @property
    def size_multiple(self):
        """What the input's height and width must be multiples of: 2 ** (levels - 1)."""
        return 2 ** (self.levels - 1)

    @property
    def time_embed_dim(self):
        return 4 * self.model_channels

    def level_channels(self, level):
        return self.model_channels * self.channel_mult[level]

    def has_attention(self, level):
        return 2 ** level in self.attention_resolutions

    def attention_levels(self):
        return tuple(i for i in range(self.levels) if self.has_attention(i))

    def heads_at(self, level, ch):
        """(heads, head_dim) of the attention site with `ch` channels at `level`."""
        if self.num_head_channels != -1:
            heads = ch // self.num_head_channels
        else:
            heads = self.num_heads if isinstance(self.num_heads, int) else self.num_heads[level]
        return heads, (ch // heads if heads > 0 else 0)

    # ---- CompVis ---------------------------------------------------------------------------

    @classmethod
    def from_compvis(cls, params, **overrides):
        """From a CompVis YAML `model.params.unet_config.params` dict (openaimodel arguments).

        `use_checkpoint` becomes `remat`; `image_size`, `use_fp16` and `legacy` are accepted and
        do not change the network (legacy only differs where channels do not split evenly into
        heads, which is rejected). `overrides` replace any resulting field.
        """
        p = dict(params)
        unknown = set(p) - _COMPVIS_KEYS
        if unknown:
            raise ValueError(f"unsupported openaimodel UNet options: {sorted(unknown)}")
        _require(p, "dims", (2,), "only 2-D UNets are supported", 2)
        _require(p, "dropout", (0, 0.0), "dropout is not implemented (every LDM config uses 0)", 0)
        _require(p, "n_embed", (None,), "predict_codebook_ids (n_embed) is not supported")
        _require(p, "use_new_attention_order", (False,),
                 "use_new_attention_order (QKVAttention) is not supported; only the legacy "
                 "qkv order",
                 False)
        for key in ("num_res_blocks", "context_dim"):
            if key in p and p[key] is not None and not isinstance(p[key], int):
                raise ValueError(f"{key} must be an int, got {p[key]!r}")
        if p.get("num_classes") is not None and not isinstance(p["num_classes"], int):
            raise ValueError(f"num_classes must be an int, got {p['num_classes']!r}")
        num_heads = p.get("num_heads", -1)
        nhc = p.get("num_head_channels", -1)
        nh_up = p.get("num_heads_upsample", -1)
        if nh_up not in (-1, num_heads) and nhc == -1 and not p.get("use_spatial_transformer"):
            raise ValueError(f"num_heads_upsample={nh_up} different from num_heads={num_heads} "
                             "is not supported")
        st = bool(p.get("use_spatial_transformer", False))
        if st and p.get("context_dim") is None:
            raise ValueError("use_spatial_transformer needs context_dim")
        kw = dict(
            in_channels=p["in_channels"], out_channels=p["out_channels"],
            model_channels=p["model_channels"],
            channel_mult=tuple(p.get("channel_mult", (1, 2, 4, 8))),
            num_res_blocks=p["num_res_blocks"],
            attention_resolutions=tuple(p["attention_resolutions"]),
            num_heads=num_heads, num_head_channels=nhc,
            use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
            resblock_updown=bool(p.get("resblock_updown", False)),
            conv_resample=bool(p.get("conv_resample", True)),
            use_spatial_transformer=st, transformer_depth=p.get("transformer_depth", 1),
            context_dim=p.get("context_dim") if st else None,
            use_linear_projection=bool(p.get("use_linear_in_transformer", False)),
            num_classes=p.get("num_classes"),
            remat=bool(p.get("use_checkpoint", False)))
        cfg = cls(**{**kw, **overrides})
        # openaimodel's `legacy` switch only matters where channels do not split evenly into heads
        for level in cfg.attention_levels() + (cfg.levels - 1,):
            ch = cfg.level_channels(level)
            heads, head_dim = cfg.heads_at(level, ch)
            if heads * head_dim != ch:
                raise ValueError(f"{ch} channels at level {level} do not split evenly into "
                                 f"{heads} heads; not supported")
        return cfg

    # ---- diffusers -------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, config, **overrides):
        """From a diffusers `UNet2DConditionModel` or `UNet2DModel` config dict.

        The class is taken from `_class_name`, else a `cross_attention_dim` key means
        UNet2DConditionModel. Raises ValueError for anything openaimodel cannot express.
        """
        c = dict(config)
        name = c.get("_class_name")
        if name is None:
            name = "UNet2DConditionModel" if "cross_attention_dim" in c else "UNet2DModel"
        if name == "UNet2DConditionModel":
            return cls(**{**_diffusers_condition_kwargs(c), **overrides})
        if name == "UNet2DModel":
            return cls(**{**_diffusers_unet2d_kwargs(c), **overrides})
        raise ValueError(f"unsupported diffusers UNet class {name!r} "
                         "(UNet2DConditionModel or UNet2DModel)")


_COMPVIS_KEYS = {
    "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
    "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims", "num_classes",
    "use_checkpoint", "use_fp16", "num_heads", "num_head_channels", "num_heads_upsample",
    "use_scale_shift_norm", "resblock_updown", "use_new_attention_order",
    "use_spatial_transformer", "transformer_depth", "context_dim", "n_embed", "legacy",
    "use_linear_in_transformer",
}


def _require(cfg, key, allowed, why, default=None):
    value = cfg.get(key, default)
    if value not in allowed:
        raise ValueError(f"unsupported UNet config {key}={value!r}: {why}")


def _uniform(cfg, key, default, n):
    """An int-or-per-block setting that must be the same for every block."""
    value = cfg.get(key, default)
    if isinstance(value, (list, tuple)):
        values = set(value)
        if len(value) != n or len(values) != 1:
            raise ValueError(f"per-block {key}={value!r} is not supported (must be uniform)")
        value = value[0]
    return value


def _strip(block_type):
    return block_type[7:] if block_type.startswith("UNetRes") else block_type


# block type -> (has attention, resampling kind; None = read from down/upsample_type)
_COND_DOWN = {"CrossAttnDownBlock2D": (True, "conv"), "DownBlock2D": (False, "conv")}
_COND_UP = {"CrossAttnUpBlock2D": (True, "conv"), "UpBlock2D": (False, "conv")}
_PLAIN_DOWN = {"AttnDownBlock2D": (True, None), "DownBlock2D": (False, "conv"),
               "ResnetDownsampleBlock2D": (False, "resnet")}
_PLAIN_UP = {"AttnUpBlock2D": (True, None), "UpBlock2D": (False, "conv"),
             "ResnetUpsampleBlock2D": (False, "resnet")}


def _diffusers_layout(c, down_table, up_table, default_down, default_up, default_channels):
    """Shared UNet2D(Condition)Model reading: channels, levels, attention sites, resampling."""
    channels = tuple(c.get("block_out_channels", default_channels))
    down = [_strip(t) for t in c.get("down_block_types", default_down)]
    up = [_strip(t) for t in c.get("up_block_types", default_up)]
    n = len(channels)
    if len(down) != n or len(up) != n:
        raise ValueError("block_out_channels, down_block_types and up_block_types differ in length")
    mc = channels[0]
    if any(ch % mc for ch in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first "
                         "(openaimodel's channel_mult)")
    for kind, types, table in (("down", down, down_table), ("up", up, up_table)):
        bad = [t for t in types if t not in table]
        if bad:
            raise ValueError(f"unsupported {kind} block types {bad}; supported: {sorted(table)}")
    attn_levels, kinds = [], set()
    for i in range(n):
        has_attn, dkind = down_table[down[i]]
        has_attn_up, ukind = up_table[up[n - 1 - i]]
        if has_attn != has_attn_up:
            raise ValueError(f"level {i}: down block {down[i]} and up block {up[n - 1 - i]} "
                             "disagree about attention")
        if has_attn:
            attn_levels.append(i)
        if i < n - 1:  # down block i downsamples; up block n-1-i (level i > 0) upsamples
            kinds.add(dkind or c.get("downsample_type") or "conv")
        if i > 0:
            kinds.add(ukind or c.get("upsample_type") or "conv")
    if not kinds <= {"conv", "resnet"} or len(kinds) > 1:
        raise ValueError(f"mixed or unsupported down/upsampling kinds {sorted(kinds)} "
                         "(all 'conv' or all 'resnet')")
    time_dim = c.get("time_embedding_dim")
    if time_dim not in (None, 4 * mc):
        raise ValueError(f"time_embedding_dim={time_dim} must be 4*block_out_channels[0]")
    shift = c.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"unsupported resnet_time_scale_shift={shift!r}")
    _require(c, "time_embedding_type", ("positional",), "only positional time embeddings",
             "positional")
    _require(c, "act_fn", ("silu", "swish"), "only SiLU", "silu")
    _require(c, "dropout", (0, 0.0), "dropout is not implemented", 0.0)
    _require(c, "center_input_sample", (False,), "not supported", False)
    _require(c, "downsample_padding", (1,), "openaimodel pads symmetrically by 1", 1)
    _require(c, "mid_block_scale_factor", (1, 1.0), "output scale factors are not supported", 1)
    _require(c, "class_embed_type", (None,), "only an nn.Embedding class embedding")
    if c.get("norm_num_groups", 32) is None:
        raise ValueError("norm_num_groups=None is not supported")
    layers = _uniform(c, "layers_per_block", 2, n)
    return dict(
        in_channels=c.get("in_channels"), out_channels=c.get("out_channels"),
        model_channels=mc, channel_mult=tuple(ch // mc for ch in channels),
        num_res_blocks=layers, attention_resolutions=tuple(2 ** i for i in attn_levels),
        use_scale_shift_norm=shift == "scale_shift", resblock_updown=kinds == {"resnet"},
        num_classes=c.get("num_class_embeds"), norm_num_groups=c.get("norm_num_groups", 32),
        norm_eps=c.get("norm_eps", 1e-5), flip_sin_to_cos=c.get("flip_sin_to_cos", True),
        freq_shift=c.get("freq_shift", 0))


# UNet2DConditionModel options that must keep these values: (key, diffusers default, allowed)
_COND_FIXED = (
    ("dual_cross_attention", False, (False,)), ("encoder_hid_dim", None, (None,)),
    ("encoder_hid_dim_type", None, (None,)), ("addition_embed_type", None, (None,)),
    ("time_embedding_act_fn", None, (None,)), ("timestep_post_act", None, (None,)),
    ("time_cond_proj_dim", None, (None,)), ("conv_in_kernel", 3, (3,)),
    ("conv_out_kernel", 3, (3,)), ("attention_type", "default", ("default",)),
    ("class_embeddings_concat", False, (False,)),
    ("mid_block_only_cross_attention", None, (None, False)),
    ("cross_attention_norm", None, (None,)), ("resnet_skip_time_act", False, (False,)),
    ("resnet_out_scale_factor", 1.0, (1, 1.0)),
    ("reverse_transformer_layers_per_block", None, (None,)),
)


def _diffusers_condition_kwargs(c):
    c.setdefault("in_channels", 4)
    c.setdefault("out_channels", 4)
    kw = _diffusers_layout(
        c, _COND_DOWN, _COND_UP,
        ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        (320, 640, 1280, 1280))
    n = len(kw["channel_mult"])
    _require(c, "mid_block_type", ("UNetMidBlock2DCrossAttn",), "openaimodel's middle block is "
             "ResBlock-SpatialTransformer-ResBlock", "UNetMidBlock2DCrossAttn")
    for key, default, allowed in _COND_FIXED:
        _require(c, key, allowed, "not representable in openaimodel", default)
    if _uniform(c, "only_cross_attention", False, n):
        raise ValueError("only_cross_attention is not supported")
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)  # diffusers' misnomer
    if isinstance(heads, (list, tuple)):
        heads = tuple(heads)
        if None in heads:
            raise ValueError(f"attention_head_dim {heads} has unset (None) entries")
        if len(heads) != n:
            raise ValueError(f"attention_head_dim {heads} needs one entry per block")
        heads = heads[0] if len(set(heads)) == 1 else heads
    context_dim = _uniform(c, "cross_attention_dim", 1280, n)
    return dict(kw, num_heads=heads, use_spatial_transformer=True,
                transformer_depth=_uniform(c, "transformer_layers_per_block", 1, n),
                context_dim=context_dim,
                use_linear_projection=bool(c.get("use_linear_projection", False)),
                mid_attention=True)


def _diffusers_unet2d_kwargs(c):
    c.setdefault("in_channels", 3)
    c.setdefault("out_channels", 3)
    kw = _diffusers_layout(
        c, _PLAIN_DOWN, _PLAIN_UP, ("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
        ("AttnUpBlock2D",) * 3 + ("UpBlock2D",), (224, 448, 672, 896))
    _require(c, "mid_block_type", ("UNetMidBlock2D",), "openaimodel always has a middle block",
             "UNetMidBlock2D")
    add_attention = bool(c.get("add_attention", True))
    groups = c.get("norm_num_groups", 32)
    attn_groups = c.get("attn_norm_num_groups")
    if attn_groups is None and c.get("resnet_time_scale_shift", "default") == "default":
        attn_groups = groups
    if add_attention and attn_groups != groups:
        raise ValueError(f"the middle attention's GroupNorm ({attn_groups} groups; diffusers drops "
                         "it for scale_shift unless attn_norm_num_groups is set) must match "
                         f"norm_num_groups={groups}")
    head_channels = c.get("attention_head_dim", 8)
    levels = kw["attention_resolutions"]
    sites = [i for i in range(len(kw["channel_mult"])) if 2 ** i in levels]
    if add_attention:
        sites.append(len(kw["channel_mult"]) - 1)
    if head_channels is None:
        heads = dict(num_heads=1)  # one head over all channels
    else:
        for i in sites:
            ch = kw["model_channels"] * kw["channel_mult"][i]
            if ch % head_channels:
                raise ValueError(f"{ch} channels do not split into heads of {head_channels}")
        heads = dict(num_head_channels=head_channels)
    return dict(kw, **heads, mid_attention=add_attention)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

def widen(a, rows):
    """a (B, ...) to `rows` (k * B) rows, each row repeated k times in place (rows k*j .. k*j+k-1
    are a[j]): where the UNet's rows meet their k contexts each (see `UNet`). A batch split over
    devices keeps each row's copies on its device. Unchanged when it has `rows` already."""
    if a.shape[0] == rows:
        return a
    if rows % a.shape[0]:
        raise ValueError(f"cannot widen {a.shape[0]} rows to {rows}")
    return jnp.repeat(a, rows // a.shape[0], axis=0)


TIME_PROJ = "time_proj"  # variable collection: each ResBlock's projection of the time embedding


class ResBlock(nn.Module):
    """openaimodel ResBlock (diffusers ResnetBlock2D), optionally resampling ('up'/'down').

    Its projection of the time embedding comes from the `time_proj` collection when the variables
    hold it (`time_projections`), and is stored there when the collection is mutable (not in `init`).
    """

    out_channels: int
    use_scale_shift_norm: bool = False
    resample: Optional[str] = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gn = dict(num_groups=self.norm_num_groups, epsilon=self.norm_eps, **kw)
        h = GroupNorm(name="norm1", silu=True, **gn)(x)
        up = self.resample == "up"  # h is upsampled inside conv1 (`layers.upsample_conv`)
        if up:
            x = upsample_nearest(x)
        elif self.resample == "down":
            h, x = avg_pool2(h), avg_pool2(x)
        h = conv(self.out_channels, name="conv1", upsample=up, **kw)(h)
        width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        e = computed_once(self, TIME_PROJ, "e", lambda: dense(width, name="time_emb_proj", **kw)(nn.silu(emb)))
        e = widen(e, x.shape[0])
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e[:, None, None, :], 2, axis=-1)
            h = nn.silu(GroupNorm(name="norm2", **gn)(h) * (1 + scale) + shift)
        else:
            h = GroupNorm(name="norm2", silu=True, **gn)(h, shift=e)
        h = conv(self.out_channels, name="conv2", zero_init=True, **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """openaimodel AttentionBlock (diffusers' Attention with group_norm and a residual)."""

    heads: int
    head_dim: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        del context  # self-attention only
        b, hh, ww, c = x.shape
        h = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype,
                      name="group_norm")(x).reshape(b, hh * ww, c)
        h = multihead(h, None, self.heads, self.head_dim, qkv_bias=True, zero_out=True,
                      dtype=self.dtype, param_dtype=self.param_dtype)
        return x + h.reshape(x.shape)


CONTEXT_KV = "context_kv"  # variable collection: each cross-attention layer's keys and values


class CrossAttention(nn.Module):
    """LDM CrossAttention (diffusers Attention): bias-free q/k/v; self-attention if no context.

    With a context, its keys and values come from the `context_kv` collection when the variables
    hold it (`context_key_values`), and are stored there when the collection is mutable (not in
    `init`). The context is zero-padded to a multiple of 8 tokens (text's 77 to 80) before its
    keys and values are projected, the padding masked out by length: cuDNN's attention takes no
    other lengths, and this way every layer's pad is one and the same (XLA computes it once)
    and a sampling loop's cached keys and values are stored padded, instead of each layer padding
    its keys and values on every step."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kv, length = None, None
        if context is not None:
            length, context = context.shape[1], pad_length(context)
            kv = computed_once(self, CONTEXT_KV, "kv", lambda: key_values(context, self.heads * self.head_dim, **kw))
        return multihead(x, context, self.heads, self.head_dim, qkv_bias=False, zero_out=False, kv=kv,
                         kv_length=length, **kw)


class GEGLU(nn.Module):
    """Dense(dim -> 2*inner) then value * gelu(gate), exact (erf) GELU: `geglu_gemm.gated_projection`
    (one kernel where it can)."""

    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Dense(2 * self.inner, name="proj", dtype=self.dtype, param_dtype=self.param_dtype,
                     product=gated_projection)(x)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x expansion (names net_0/proj, net_2)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return dense(x.shape[-1], name="net_2", **kw)(h)


class TransformerBlock(nn.Module):
    """Pre-LN BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, head_dim=self.head_dim, **kw)
        x = residual(x, CrossAttention(name="attn1", **attn)(LayerNorm(name="norm1", **kw)(x)))
        if context is not None:  # the rows part ways here when they meet several contexts each
            x = widen(x, context.shape[0])
        x = residual(x, CrossAttention(name="attn2", **attn)(LayerNorm(name="norm2", **kw)(x), context))
        return residual(x, FeedForward(name="ff", **kw)(LayerNorm(name="norm3", **kw)(x)))


class SpatialTransformer(nn.Module):
    """LDM SpatialTransformer (diffusers Transformer2DModel, continuous input)."""

    heads: int
    head_dim: int
    depth: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        inner = self.heads * self.head_dim
        h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = dense(inner, name="proj_in", **kw)(h.reshape(b, hh * ww, c))
        else:
            h = conv(inner, 1, padding=0, name="proj_in", **kw)(h).reshape(b, hh * ww, inner)
        for k in range(self.depth):
            h = TransformerBlock(self.heads, self.head_dim, name=f"transformer_blocks_{k}",
                                 **kw)(h, context)
        x = widen(x, h.shape[0])
        if self.use_linear_projection:
            h = dense(c, name="proj_out", zero_init=True, **kw)(h).reshape(x.shape)
        else:
            h = conv(c, 1, padding=0, name="proj_out", zero_init=True,
                     **kw)(h.reshape(x.shape[:3] + (inner,)))
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv, symmetric padding 1."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(x.shape[-1], 3, stride=2, padding=1, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (four per-phase 2x2 convolutions of x: `layers.upsample_conv`)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(x.shape[-1], name="conv", dtype=self.dtype, param_dtype=self.param_dtype, upsample=True)(x)


class _LevelBlock(nn.Module):
    """Base for the UNet's blocks: builds ResBlocks, attention and resamplers from the config."""

    config: UNetConfig
    level: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _wrap(self, cls):
        return gathering(cls, remat=self.config.remat)

    def res(self, name, out_channels, resample=None):
        cfg = self.config
        return self._wrap(ResBlock)(out_channels, cfg.use_scale_shift_norm, resample,
                                    cfg.norm_num_groups, cfg.norm_eps, name=name, **self._kw())

    def attn(self, name, ch):
        cfg = self.config
        heads, head_dim = cfg.heads_at(self.level, ch)
        if cfg.use_spatial_transformer:
            return self._wrap(SpatialTransformer)(heads, head_dim, cfg.transformer_depth,
                                                  cfg.norm_num_groups, cfg.use_linear_projection,
                                                  name=name, **self._kw())
        return self._wrap(AttentionBlock)(heads, head_dim, cfg.norm_num_groups, cfg.norm_eps,
                                          name=name, **self._kw())

    def resample(self, x, emb, direction, name):
        """Down- or upsample x by 2 as the config says (conv, resnet or parameter-free)."""
        cfg = self.config
        if cfg.resblock_updown:
            return self.res(name, x.shape[-1], direction)(x, emb)
        if direction == "down":
            return gathering(Downsample)(name=name, **self._kw())(x) if cfg.conv_resample else avg_pool2(x)
        return gathering(Upsample)(name=name, **self._kw())(x) if cfg.conv_resample else upsample_nearest(x)


class DownBlock(_LevelBlock):
    """One encoder level: ResBlocks (+ attention), then a downsampler except at the last level."""

    @nn.compact
    def __call__(self, x, emb, context=None):
        cfg = self.config
        ch = cfg.level_channels(self.level)
        skips = []
        for j in range(cfg.num_res_blocks):
            x = self.res(f"resnets_{j}", ch)(x, emb)
            if cfg.has_attention(self.level):
                x = self.attn(f"attentions_{j}", ch)(x, context)
            skips.append(x)
        if self.level < cfg.levels - 1:
            x = self.resample(x, emb, "down", "downsamplers_0")
            skips.append(x)
        return x, skips


class MidBlock(_LevelBlock):
    """ResBlock, attention, ResBlock at the lowest resolution."""

    @nn.compact
    def __call__(self, x, emb, context=None):
        ch = x.shape[-1]
        x = self.res("resnets_0", ch)(x, emb)
        if self.config.mid_attention:
            x = self.attn("attentions_0", ch)(x, context)
        return self.res("resnets_1", ch)(x, emb)


class UpBlock(_LevelBlock):
    """One decoder level: (num_res_blocks+1) x [concat skip, ResBlock (+ attention)], upsampler."""

    @nn.compact
    def __call__(self, x, skips, emb, context=None):
        cfg = self.config
        ch = cfg.level_channels(self.level)
        skips = list(skips)
        for j in range(cfg.num_res_blocks + 1):
            x = jnp.concatenate([x, widen(skips.pop(), x.shape[0])], axis=-1)
            x = self.res(f"resnets_{j}", ch)(x, emb)
            if cfg.has_attention(self.level):
                x = self.attn(f"attentions_{j}", ch)(x, context)
        if self.level > 0:
            x = self.resample(x, emb, "up", "upsamplers_0")
        return x


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(dense(self.features, name="linear_1", **kw)(x))
        return dense(self.features, name="linear_2", **kw)(x)


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------

class UNet(nn.Module):
    """The LDM UNet: `(x NHWC, t (B,), context (B,L,D)?, y (B,)?) -> (B,H,W,out_channels)`.

    Returns float32 (the output head always runs in float32). H and W must be divisible by 2**(levels-1).

    The context may hold k contexts for each row of x, (k * B, L, D), its rows k * j .. k * j + k - 1
    meeting x[j] (classifier-free guidance: x once, its unconditional and conditional context): the
    output has k * B rows, as for each row of x and t repeated k times in place, but everything
    before the first cross-attention (the input conv, the first ResBlocks, the first self-attention)
    runs once.
    """

    gathers_params = True  # FSDP: each layer gathers its own weights (layers.gathering)

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, context=None, y=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        f = cfg.size_multiple
        if hh % f or ww % f:
            raise ValueError(f"input size {hh}x{ww} is not divisible by {f}")
        if c != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channels, got {c}")
        context = self._check_context(context, b)

        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        emb = timestep_embedding(t, cfg.model_channels, cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = gathering(TimestepEmbedding)(cfg.time_embed_dim, name="time_embedding", **kw)(emb)
        if cfg.num_classes is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass y (B,) class labels")
            emb = emb + gathering(nn.Embed)(cfg.num_classes, cfg.time_embed_dim, name="class_embedding",
                                            **kw)(jnp.asarray(y, jnp.int32))
        elif y is not None:
            raise ValueError("y given but the UNet has no num_classes")

        h = conv(cfg.model_channels, name="conv_in", gather=True, **kw)(x.astype(self.dtype))
        skips = [h]
        for level in range(cfg.levels):
            h, s = DownBlock(cfg, level, name=f"down_blocks_{level}", **kw)(h, emb, context)
            skips += s
        h = MidBlock(cfg, cfg.levels - 1, name="mid_block", **kw)(h, emb, context)
        n = cfg.num_res_blocks + 1
        for i, level in enumerate(reversed(range(cfg.levels))):
            h = UpBlock(cfg, level, name=f"up_blocks_{i}", **kw)(h, skips[-n:], emb, context)
            skips = skips[:-n]
        if context is not None:  # a UNet whose cross-attention never came
            h = widen(h, context.shape[0])
        # The output head runs in float32: guidance amplifies rounding of eps by ~2*scale.
        f32 = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
        h = gathering(GroupNorm)(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", silu=True,
                                **f32)(h)
        return conv(cfg.out_channels, name="conv_out", zero_init=True, gather=True, **f32)(h)

    def _check_context(self, context, batch):
        cfg = self.config
        if not (cfg.use_spatial_transformer and cfg.context_dim is not None):
            if context is not None and not cfg.use_spatial_transformer:
                raise ValueError("context given but the UNet has no cross-attention")
            return None if context is None else jnp.asarray(context, self.dtype)
        if context is None:
            raise ValueError(f"this UNet cross-attends: pass context (B, L, {cfg.context_dim})")
        context = jnp.asarray(context, self.dtype)
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim or context.shape[0] % batch:
            raise ValueError(f"context must be ({batch}, L, {cfg.context_dim}) or k * {batch} rows of "
                             f"it (shared x), got {context.shape}")
        return context


def time_projections(unet, params, t, y=None):
    """Every ResBlock's projection of the time embedding of timesteps t (B,) (and class labels y), as
    the `time_proj` collection: they depend on nothing else. A sampling loop computes them for all
    its steps before the loop (`samplers.sample`'s `per_step`) and passes each step's back with the
    parameters, `unet.apply({"params": params, "time_proj": e}, x, t, context)`: the step then runs
    neither the embedding's MLP nor the ResBlocks' small GEMMs (22 of 16 rows a step in the txt2img
    UNet at batch 16, each reading its whole weight). Their rows may be fewer than x's, by a factor:
    they are repeated (`widen`). As `context_key_values`, it runs the UNet on a small zero input whose
    output is dropped: under `jax.jit`, dead code but the embedding."""
    cfg = unet.config
    context = None
    if cfg.use_spatial_transformer and cfg.context_dim is not None:
        context = jnp.zeros((t.shape[0], 1, cfg.context_dim), jnp.float32)
    return _collected(unet, params, TIME_PROJ, t, context, y)


def prepared_weights(unet, params):
    """What the UNet's layers derive from their parameters alone, as the `prepared` collection: the
    upsampling convolutions' per-phase kernels (`layers.upsample_phases`). A sampling loop computes
    them once and passes them back with the parameters, `unet.apply({"params": params, "prepared": w},
    ...)`: XLA leaves them in the loop by itself, where the txt2img UNet's three upsamplers refold
    their kernels on every step (~170 us on an H200, 1.2% of the loop; BENCHMARKS.md, session 23)."""
    cfg = unet.config
    context = None
    if cfg.use_spatial_transformer and cfg.context_dim is not None:
        context = jnp.zeros((1, 1, cfg.context_dim), jnp.float32)
    y = None if cfg.num_classes is None else jnp.zeros((1,), jnp.int32)
    return _collected(unet, params, PREPARED, jnp.zeros((1,)), context, y)


def _collected(unet, params, collection, t, context, y):
    """The `collection` the UNet's layers store (`computed_once`) when run on timesteps t (B,), a
    context and labels y, and a small zero input whose output is dropped."""
    cfg = unet.config
    s = cfg.size_multiple
    x = jnp.zeros((t.shape[0], s, s, cfg.in_channels), jnp.float32)
    # "params" mutable too: flax's map_variables (layers.gathering) cannot take another mutable
    # collection alone
    _, state = unet.apply({"params": params}, x, t, context, y, mutable=["params", collection])
    return state[collection]


def context_key_values(unet, params, context):
    """The keys and values of `context` of every cross-attention layer, as the `context_kv` collection.

    Computed once where the context does not change (a sampling loop), they are passed back with
    the parameters, `unet.apply({"params": params, "context_kv": kv}, x, t, context)`, and replace
    the layers' k/v projections on every step (XLA does not move them out of the loop by itself: the
    txt2img UNet's six widest sites alone project 101 GFLOP a step at batch 16 with guidance; the
    cache is 111 MiB there). The call runs the UNet on a small zero input whose output is dropped:
    under `jax.jit` all but the projections is dead code."""
    b = context.shape[0]
    y = None if unet.config.num_classes is None else jnp.zeros((b,), jnp.int32)
    return _collected(unet, params, CONTEXT_KV, jnp.zeros((b,)), context, y)
