"""The first-stage autoencoders of Latent Diffusion: AutoencoderKL and VQModel (CompVis semantics).

NHWC activations. Parameter names are diffusers' state-dict names with `.N` folded into `_N`
(`encoder/down_blocks_0/resnets_0/conv1/kernel`, `decoder/up_blocks_0/...` with up_blocks ordered
lowest resolution first, `quantize/embedding/embedding`), so `convert.torch_names` loads diffusers
checkpoints by rule. CompVis' own names (`down.0.block.0`, `up.3`, `nin_shortcut`, ...) need the
loader's renaming first.
"""
import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from latentdiff.models.attention import attention
from latentdiff.models.layers import GroupNorm, conv, dense

Dtype = Any

_DIFFUSERS_DOWN = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_DIFFUSERS_UP = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
_DIFFUSERS_DEFAULT_LATENT = {"kl": 4, "vq": 3}


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Hyper-parameters of a first-stage model (CompVis `ddconfig` vocabulary).

    `attn_resolutions` are pixel sizes: level i (resolution // 2**i px) gets attention after each
    ResnetBlock when its size is listed. `attn_type='none'` removes the mid-block attention.
    """

    kind: str = "kl"
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = ()
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    n_embed: int = 0
    attn_type: str = "vanilla"
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    vq_beta: float = 0.25

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.kind not in ("kl", "vq"):
            raise ValueError(f"autoencoder kind must be 'kl' or 'vq', got {self.kind!r}")
        if self.attn_type not in ("vanilla", "none"):
            raise ValueError(f"attn_type {self.attn_type!r} is not supported "
                             "(use 'vanilla' or 'none')")
        if self.kind == "vq" and self.n_embed <= 0:
            raise ValueError("a VQ autoencoder needs n_embed > 0 (the codebook size)")
        bad = [c for c in self.block_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channel counts {bad} are not divisible by norm_num_groups="
                             f"{self.norm_num_groups}")

    @property
    def block_channels(self):
        """Output channels of each resolution level, highest resolution first."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsample_factor(self):
        """Spatial factor between image and latent (the `f` of KL-f8)."""
        return 2 ** (len(self.ch_mult) - 1)

    def level_has_attention(self, level):
        """Whether level `level` (0 = full resolution) has attention blocks."""
        return (self.resolution // 2 ** level) in self.attn_resolutions

    @classmethod
    def from_compvis(cls, ddconfig, embed_dim, n_embed=None):
        """Build from a CompVis YAML `ddconfig` (+ `embed_dim`, and `n_embed` for VQ models)."""
        kind = "vq" if n_embed else "kl"
        double_z = bool(ddconfig.get("double_z", True))
        if double_z != (kind == "kl"):
            raise ValueError(f"double_z={double_z} does not fit a {kind.upper()} autoencoder")
        _reject(ddconfig, dropout=0.0, resamp_with_conv=True, use_linear_attn=False,
                give_pre_end=False, tanh_out=False)
        return cls(kind=kind, in_channels=ddconfig.get("in_channels", 3),
                   out_channels=ddconfig.get("out_ch", 3), ch=ddconfig["ch"],
                   ch_mult=tuple(ddconfig.get("ch_mult", (1, 2, 4, 8))),
                   num_res_blocks=ddconfig["num_res_blocks"],
                   attn_resolutions=tuple(ddconfig.get("attn_resolutions", ())),
                   resolution=ddconfig.get("resolution", 256), z_channels=ddconfig["z_channels"],
                   embed_dim=embed_dim, n_embed=n_embed or 0,
                   attn_type=ddconfig.get("attn_type", "vanilla"))

    @classmethod
    def from_diffusers(cls, config, kind=None):
        """Build from a diffusers `AutoencoderKL` / `VQModel` config.json dict.

        Missing keys take diffusers' defaults; `kind` ('kl' | 'vq') defaults to `_class_name`'s.
        """
        kind = kind or {"AutoencoderKL": "kl", "VQModel": "vq"}.get(config.get("_class_name"))
        if kind not in ("kl", "vq"):
            raise ValueError("cannot tell whether this is a KL or VQ autoencoder: "
                             "pass kind='kl' or 'vq'")
        _reject(config, act_fn="silu", norm_type="group", use_quant_conv=True,
                use_post_quant_conv=True, lookup_from_codebook=False)
        channels = tuple(config.get("block_out_channels", (64,)))
        levels = len(channels)
        down = _level_attention(config.get("down_block_types", ("DownEncoderBlock2D",)),
                                _DIFFUSERS_DOWN, levels)
        up = _level_attention(config.get("up_block_types", ("UpDecoderBlock2D",)),
                              _DIFFUSERS_UP, levels)[::-1]
        if down != up:
            raise ValueError("encoder and decoder attention levels differ "
                             f"(down {down}, up reversed {up}); only symmetric models work")
        size = config.get("sample_size", 32)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        size = max(size, 2 ** (levels - 1))  # every level needs a distinct pixel size
        ch = math.gcd(*channels)
        latent = config.get("latent_channels", _DIFFUSERS_DEFAULT_LATENT[kind])
        embed = (config.get("vq_embed_dim") or latent) if kind == "vq" else latent
        return cls(kind=kind, in_channels=config.get("in_channels", 3),
                   out_channels=config.get("out_channels", 3), ch=ch,
                   ch_mult=tuple(c // ch for c in channels),
                   num_res_blocks=config.get("layers_per_block", 1),
                   attn_resolutions=tuple(size // 2 ** i for i in range(levels) if down[i]),
                   resolution=size, z_channels=latent, embed_dim=embed,
                   n_embed=config.get("num_vq_embeddings", 256) if kind == "vq" else 0,
                   attn_type="vanilla" if config.get("mid_block_add_attention", True) else "none",
                   norm_num_groups=config.get("norm_num_groups", 32))


def _reject(config, **supported):
    """Raise ValueError when a config key is set to anything but the one value we support."""
    for key, value in supported.items():
        if key in config and config[key] is not None and config[key] != value:
            if not (key == "act_fn" and config[key] == "swish"):
                raise ValueError(f"unsupported autoencoder option {key}={config[key]!r} "
                                 f"(only {value!r} is implemented)")


def _level_attention(block_types, table, levels):
    """diffusers block type names -> per-level attention flags."""
    if len(block_types) != levels:
        raise ValueError(f"{len(block_types)} block types for {levels} block_out_channels")
    unknown = [t for t in block_types if t not in table]
    if unknown:
        raise ValueError(f"unsupported autoencoder block types {unknown} (known: {sorted(table)})")
    return tuple(table[t] for t in block_types)


# ----------------------------------------------------------------------------- posterior


@flax.struct.dataclass
class DiagonalGaussian:
    """The KL autoencoder's posterior N(mean, exp(logvar)), NHWC, float32, logvar in [-30, 20]."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        """Split (..., 2C) moments into mean and clamped logvar (mean first, as in torch.chunk)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, rng):
        """mean + std * eps, eps ~ N(0, 1)."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self, other=None):
        """KL(self || other), other defaulting to N(0, 1); summed over H, W, C -> (B,)."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

    def nll(self, x, axis=(1, 2, 3)):
        """Gaussian negative log-likelihood of `x`, summed over `axis`."""
        x = jnp.asarray(x, jnp.float32)
        terms = np.log(2.0 * np.pi) + self.logvar + jnp.square(x - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=axis)


# ----------------------------------------------------------------------------- blocks


class _Block(nn.Module):
    """Base of the autoencoder blocks: config, compute and storage dtypes."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, features, name, kernel=3, stride=1, padding=1, upsample=False):
        return conv(features, kernel, stride, padding, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name, upsample=upsample)

    def norm(self, name, dtype=None, silu=False):
        return GroupNorm(self.config.norm_num_groups, self.config.norm_eps,
                         dtype=dtype or self.dtype, param_dtype=self.param_dtype, silu=silu, name=name)

    def norm_swish(self, x, name):
        """GroupNorm then swish in float32 (the next conv rounds once to the compute dtype)."""
        return self.norm(name, jnp.float32, silu=True)(x)

    def sub(self, cls, name, **kwargs):
        return cls(self.config, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kwargs)


class ResnetBlock(_Block):
    """norm1-swish-conv1-norm2-swish-conv2 plus a skip (1x1 `conv_shortcut` if channels change)."""

    out_channels: int = 0

    @nn.compact
    def __call__(self, x):
        h = self.conv(self.out_channels, "conv1")(self.norm_swish(x, "norm1"))
        h = self.conv(self.out_channels, "conv2")(self.norm_swish(h, "norm2"))
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, "conv_shortcut", kernel=1, padding=0)(x)
        return x + h


class AttnBlock(_Block):
    """Single-head self-attention over all pixels with a residual (diffusers `Attention` names)."""

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        h = self.norm("group_norm")(x).reshape(b, height * width, 1, c)
        proj = lambda name: dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        o = attention(proj("to_q")(h), proj("to_k")(h), proj("to_v")(h))
        o = proj("to_out_0")(o.reshape(b, height * width, c))
        return x + o.reshape(x.shape)


class Downsample(_Block):
    """Right/bottom zero pad of 1, then a stride-2 3x3 VALID conv (the CompVis quirk)."""

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x.shape[-1], "conv", stride=2, padding="VALID")(x)


class Upsample(_Block):
    """Nearest-neighbour x2, then a 3x3 conv (four per-phase 2x2 convolutions of x: `layers.upsample_conv`)."""

    @nn.compact
    def __call__(self, x):
        return self.conv(x.shape[-1], "conv", upsample=True)(x)


class LevelBlock(_Block):
    """One resolution level: ResnetBlocks (each followed by attention if `attn`), then resampling.

    `resample` is 'down' (encoder), 'up' (decoder) or None (the last level on each side).
    """

    out_channels: int = 0
    num_layers: int = 1
    attn: bool = False
    resample: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = self.sub(ResnetBlock, f"resnets_{j}", out_channels=self.out_channels)(x)
            if self.attn:
                x = self.sub(AttnBlock, f"attentions_{j}")(x)
        if self.resample == "down":
            x = self.sub(Downsample, "downsamplers_0")(x)
        elif self.resample == "up":
            x = self.sub(Upsample, "upsamplers_0")(x)
        return x


class MidBlock(_Block):
    """ResnetBlock, attention (unless attn_type='none'), ResnetBlock, at constant width."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = self.sub(ResnetBlock, "resnets_0", out_channels=c)(x)
        if self.config.attn_type != "none":
            x = self.sub(AttnBlock, "attentions_0")(x)
        return self.sub(ResnetBlock, "resnets_1", out_channels=c)(x)


class Encoder(_Block):
    """Image (B,H,W,in) -> (B,H/f,W/f,z) features; 2z channels for KL (mean and logvar)."""

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        chans = cfg.block_channels
        x = self.conv(chans[0], "conv_in")(x)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            x = self.sub(LevelBlock, f"down_blocks_{i}", out_channels=c,
                         num_layers=cfg.num_res_blocks, attn=cfg.level_has_attention(i),
                         resample=None if last else "down")(x)
        x = self.sub(MidBlock, "mid_block")(x)
        x = self.norm_swish(x, "conv_norm_out")
        out = 2 * cfg.z_channels if cfg.kind == "kl" else cfg.z_channels
        return self.conv(out, "conv_out")(x)


class Decoder(_Block):
    """(B,h,w,z) latents -> image (B,h*f,w*f,out); up_blocks_0 is the lowest resolution."""

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        chans = cfg.block_channels
        x = self.conv(chans[-1], "conv_in")(z)
        x = self.sub(MidBlock, "mid_block")(x)
        for j, level in enumerate(reversed(range(len(chans)))):
            x = self.sub(LevelBlock, f"up_blocks_{j}", out_channels=chans[level],
                         num_layers=cfg.num_res_blocks + 1, attn=cfg.level_has_attention(level),
                         resample="up" if level else None)(x)
        x = self.norm_swish(x, "conv_norm_out")
        return self.conv(cfg.out_channels, "conv_out")(x)


# ----------------------------------------------------------------------------- models


class AutoencoderKL(_Block):
    """KL-regularised autoencoder: `encode` -> DiagonalGaussian, `decode` latents -> image."""

    def setup(self):
        cfg = self.config
        self.encoder = self.sub(Encoder, None)
        self.decoder = self.sub(Decoder, None)
        self.quant_conv = self.conv(2 * cfg.embed_dim, None, kernel=1, padding=0)
        self.post_quant_conv = self.conv(cfg.z_channels, None, kernel=1, padding=0)

    def encode(self, x):
        """Image (B,H,W,C) -> posterior over (B,H/f,W/f,embed_dim) latents."""
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """Latents (B,h,w,embed_dim) -> image."""
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x, sample_posterior=True, rng=None):
        """-> (reconstruction, posterior); samples with `rng` (or the 'sample' stream)."""
        posterior = self.encode(x)
        if sample_posterior:
            z = posterior.sample(rng if rng is not None else self.make_rng("sample"))
        else:
            z = posterior.mode()
        return self.decode(z), posterior


def _uniform_codebook(n):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -1.0 / n, 1.0 / n)

    return init


class VectorQuantizer(_Block):
    """Nearest-codebook quantiser (taming VectorQuantizer2, legacy loss, straight-through)."""

    def setup(self):
        cfg = self.config
        self.embedding = nn.Embed(cfg.n_embed, cfg.embed_dim, param_dtype=self.param_dtype,
                                  embedding_init=_uniform_codebook(cfg.n_embed))

    def codebook(self):
        return self.embedding.embedding.astype(jnp.float32)

    def __call__(self, z):
        """(B,h,w,d) -> (z_q straight-through, codebook loss, indices (B,h,w))."""
        table = self.codebook()
        zf = z.astype(jnp.float32)
        flat = zf.reshape(-1, zf.shape[-1])
        # ||z||^2 is the same for every code and does not change the argmin.
        dist = jnp.sum(jnp.square(table), axis=1)[None] - 2.0 * flat @ table.T
        indices = jnp.argmin(dist, axis=1).reshape(zf.shape[:-1])
        zq = table[indices]
        sg = jax.lax.stop_gradient
        loss = (jnp.mean(jnp.square(sg(zq) - zf))
                + self.config.vq_beta * jnp.mean(jnp.square(zq - sg(zf))))
        zq = zf + sg(zq - zf)
        return zq.astype(z.dtype), loss, indices

    def lookup(self, indices):
        """Integer indices (...) -> codebook vectors (..., d)."""
        return self.codebook()[indices]


class VQModel(_Block):
    """VQ autoencoder; `encode` returns PRE-quantisation latents (what LDMs diffuse in)."""

    def setup(self):
        cfg = self.config
        self.encoder = self.sub(Encoder, None)
        self.decoder = self.sub(Decoder, None)
        self.quant_conv = self.conv(cfg.embed_dim, None, kernel=1, padding=0)
        self.quantizer = self.sub(VectorQuantizer, "quantize")
        self.post_quant_conv = self.conv(cfg.z_channels, None, kernel=1, padding=0)

    def encode(self, x):
        """Image -> continuous pre-quantisation latents (B,H/f,W/f,embed_dim)."""
        return self.quant_conv(self.encoder(x))

    def quantize(self, h):
        """-> (z_q with straight-through gradient, codebook loss, indices (B,h,w))."""
        return self.quantizer(h)

    def decode(self, h, force_not_quantize=False):
        """Latents -> image, quantising them first unless `force_not_quantize`."""
        if not force_not_quantize:
            h = self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(h))

    def decode_indices(self, indices):
        """Codebook indices (B,h,w) -> image."""
        return self.decode(self.quantizer.lookup(indices), force_not_quantize=True)

    def __call__(self, x):
        """-> (reconstruction, codebook loss, indices)."""
        zq, loss, indices = self.quantize(self.encode(x))
        return self.decode(zq, force_not_quantize=True), loss, indices


def make_autoencoder(config, dtype=jnp.float32, param_dtype=jnp.float32):
    """The AutoencoderKL or VQModel that `config.kind` names."""
    cls = AutoencoderKL if config.kind == "kl" else VQModel
    return cls(config, dtype=dtype, param_dtype=param_dtype)


def first_stage_latents(vae, params, images, rng=None):
    """Unscaled LDM latents of [-1, 1] images: VQ pre-quantisation latents, or for KL a posterior
    sample (with `rng`) or its mode (without)."""
    out = vae.apply({"params": params}, images, method="encode")
    if isinstance(out, DiagonalGaussian):
        return out.mode() if rng is None else out.sample(rng)
    return out.astype(jnp.float32)
