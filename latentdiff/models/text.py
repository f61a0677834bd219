"""The paper's text encoder: a BERT-sized transformer trained from scratch with the LDM (LDMBert).

CompVis calls it `BERTEmbedder` (x-transformers `TransformerWrapper` + `Encoder`), diffusers
`LDMBertModel`; both compute the same thing: token + learned absolute position embeddings, pre-LN
blocks (self-attention without mask, then an exact-GELU MLP), a final LayerNorm. Parameter names are
diffusers' (`model/layers_3/self_attn/q_proj/kernel`), so its weights convert by the generic rule.
diffusers' `to_logits` head is unused by the pipeline and not held here: ignore it when loading.
CompVis' x-transformers names map onto these by `convert.compvis.bert_embedder_to_diffusers`.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from latentdiff.models.attention import multihead
from latentdiff.models.layers import LayerNorm, dense, gathering, gelu

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Sizes of the text encoder; the defaults are the released txt2img model's (543 M params)."""

    vocab_size: int = 30522
    max_length: int = 77
    width: int = 1280
    depth: int = 32
    heads: int = 8
    head_dim: int = 64
    ffn_dim: int = 5120
    layer_norm_eps: float = 1e-5
    remat: bool = False  # activation checkpointing of each layer: training memory, same values

    @classmethod
    def from_diffusers(cls, config: dict):
        """From an `LDMBertConfig` dict (the `bert/config.json` of a diffusers folder)."""
        act = config.get("activation_function", "gelu")
        if act != "gelu":
            raise ValueError(f"LDMBert with activation_function={act!r} is not supported (only 'gelu')")
        d = cls()
        return cls(vocab_size=config.get("vocab_size", d.vocab_size),
                   max_length=config.get("max_position_embeddings", d.max_length),
                   width=config.get("d_model", d.width),
                   depth=config.get("encoder_layers", d.depth),
                   heads=config.get("encoder_attention_heads", d.heads),
                   head_dim=config.get("head_dim", d.head_dim),
                   ffn_dim=config.get("encoder_ffn_dim", d.ffn_dim))

    @classmethod
    def from_compvis(cls, params: dict):
        """From the YAML `params` of CompVis' BERTEmbedder / TransformerEmbedder (n_embed, n_layer).

        x-transformers' defaults apply: 8 heads of 64 whatever the width, MLP 4 x width. `heads` and
        `dim_head` (x-transformers' Encoder arguments) may be given to size a small encoder, and
        `use_checkpoint` (ours, as the UNet's) checkpoints each layer's activations in training.
        """
        width = params["n_embed"]
        return cls(vocab_size=params.get("vocab_size", 30522),
                   max_length=params.get("max_seq_len", 77),
                   width=width, depth=params["n_layer"], heads=params.get("heads", 8),
                   head_dim=params.get("dim_head", 64), ffn_dim=4 * width,
                   remat=bool(params.get("use_checkpoint", False)))


class SelfAttention(nn.Module):
    """Multi-head self-attention without mask: q/k/v without bias, output projection with bias."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return multihead(x, None, self.heads, self.head_dim, names=("q_proj", "k_proj", "v_proj", "out_proj"),
                         dtype=self.dtype, param_dtype=self.param_dtype)


class LDMBertLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(cfg.layer_norm_eps, name="self_attn_layer_norm", **kw)(x)
        x = x + SelfAttention(cfg.heads, cfg.head_dim, name="self_attn", **kw)(h)
        h = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
        h = gelu(dense(cfg.ffn_dim, name="fc1", **kw)(h))
        return x + dense(cfg.width, name="fc2", **kw)(h)


class LDMBertEncoder(nn.Module):
    """Embeddings, `depth` blocks and the final LayerNorm (diffusers' `LDMBertEncoder`)."""

    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = input_ids.shape[-1]
        if length > cfg.max_length:
            raise ValueError(f"{length} tokens given; the text encoder takes at most {cfg.max_length}")
        init = nn.initializers.normal(0.02)
        tokens = gathering(nn.Embed)(cfg.vocab_size, cfg.width, embedding_init=init, name="embed_tokens", **kw)
        positions = gathering(nn.Embed)(cfg.max_length, cfg.width, embedding_init=init, name="embed_positions",
                                        **kw)
        x = tokens(input_ids) + positions(jnp.arange(length))[None]
        layer = gathering(LDMBertLayer, remat=cfg.remat)
        for i in range(cfg.depth):
            x = layer(cfg, name=f"layers_{i}", **kw)(x)
        return gathering(LayerNorm)(cfg.layer_norm_eps, name="layer_norm", **kw)(x)


class LDMBert(nn.Module):
    """Token ids (B, L) int32 -> embeddings (B, L, width); params under `model/` as in diffusers."""

    gathers_params = True  # FSDP: each layer gathers its own weights (layers.gathering)

    config: TextEncoderConfig = TextEncoderConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        return LDMBertEncoder(self.config, self.dtype, self.param_dtype, name="model")(input_ids)

