"""Tiny random-weight LDMs written to disk in the formats `from_pretrained` reads."""
import os
import re

import numpy as np

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "painting", "photo",
         "red", "green", "blue", "circle", "square", "triangle", "squirrel", "eating", "burger",
         "at", "top", "bottom", "left", "right", "##s", "##ing", ",", ".", "!"]


def write_vocab(folder):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(VOCAB) + "\n")
    return path


def perturb_(module, scale=0.05, seed=0):
    """Add noise to every parameter so that zero-initialised layers cannot hide mistakes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def ldm_text2img_folder(path):
    """A diffusers LDMTextToImagePipeline (AutoencoderKL f8, LDMBert, cross-attention UNet)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0), seed=1)
    vae = perturb_(AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=8, sample_size=32), seed=2)
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(VOCAB), max_position_embeddings=77, d_model=32,
                                      encoder_layers=2, encoder_attention_heads=2, head_dim=16,
                                      encoder_ffn_dim=64))
    perturb_(bert, seed=3)
    tok = transformers.BertTokenizer(vocab=write_vocab(os.path.join(path, "_vocab")))
    assert len(tok) == len(VOCAB)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    for m in (unet, vae, bert):
        m.eval()  # no dropout in the reference
    pipe = LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tok, unet=unet, scheduler=sched)
    pipe.save_pretrained(path)
    return pipe


def psnr(a, b):
    """PSNR in dB between two uint8 image arrays."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# ---------------------------------------------------------------------------- CompVis layout
_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_AE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _swap(rest, table):
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _legacy_attention(sd, heads):
    """UNet2DModel attention (group_norm, to_q/k/v, to_out.0 Linear) -> openaimodel AttentionBlock
    (norm, one qkv conv1d whose 3C rows are grouped per head as [q_h, k_h, v_h], proj_out conv1d)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(.*attentions\.\d+)\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
        if m is None:
            out[k] = v
            continue
        pre, name, param = m.groups()
        conv1d = (lambda a: a[..., None]) if param == "weight" else (lambda a: a)
        if name == "group_norm":
            out[f"{pre}.norm.{param}"] = v
        elif name == "to_out.0":
            out[f"{pre}.proj_out.{param}"] = conv1d(v)
        elif name == "to_q":
            c = v.shape[0]
            h = heads(c)
            parts = [sd[f"{pre}.{n}.{param}"].reshape((h, c // h) + v.shape[1:])
                     for n in ("to_q", "to_k", "to_v")]
            out[f"{pre}.qkv.{param}"] = conv1d(np.stack(parts, 1).reshape((3 * c,) + v.shape[1:]))
    return out


def compvis_unet_names(sd, num_res_blocks, attention_levels, heads=None):
    """diffusers UNet2DConditionModel / UNet2DModel names -> openaimodel.UNetModel names (test-side,
    independent). `heads(ch)`: UNet2DModel attention becomes a legacy AttentionBlock with that many
    heads; ResnetBlock2D resamplers (resblock_updown) become ResBlocks."""
    r = num_res_blocks
    if heads is not None:
        sd = _legacy_attention(sd, heads)
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "conv_in":
            n = "input_blocks.0.0." + p[1]
        elif p[0] == "time_embedding":
            n = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[p[1]] + "." + p[2]
        elif p[0] == "conv_norm_out":
            n = "out.0." + p[1]
        elif p[0] == "conv_out":
            n = "out.2." + p[1]
        elif p[0] == "mid_block":
            idx = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(p[1:3])]
            rest = ".".join(p[3:])
            n = f"middle_block.{idx}." + (_swap(rest, _RES) if p[1] == "resnets" else rest)
        elif p[0] in ("down_blocks", "up_blocks"):
            lvl, kind, rest = int(p[1]), p[2], ".".join(p[4:])
            if p[0] == "down_blocks":
                j = int(p[3])
                base = 1 + lvl * (r + 1)
                if kind == "downsamplers" and p[4] != "conv":  # resblock_updown
                    n = f"input_blocks.{base + r}.0." + _swap(rest, _RES)
                elif kind == "downsamplers":
                    n = f"input_blocks.{base + r}.0.op.{p[-1]}"
                else:
                    n = f"input_blocks.{base + j}.{0 if kind == 'resnets' else 1}." + (
                        _swap(rest, _RES) if kind == "resnets" else rest)
            else:
                j = int(p[3])
                base = lvl * (r + 1)
                if kind == "upsamplers":
                    sub = 2 if attention_levels[lvl] else 1
                    n = f"output_blocks.{base + r}.{sub}." + (
                        f"conv.{p[-1]}" if p[4] == "conv" else _swap(rest, _RES))
                else:
                    n = f"output_blocks.{base + j}.{0 if kind == 'resnets' else 1}." + (
                        _swap(rest, _RES) if kind == "resnets" else rest)
        else:
            raise KeyError(k)
        out[n] = v
    return out


def compvis_autoencoder_names(sd, num_levels):
    """diffusers VQModel/AutoencoderKL names -> CompVis Encoder/Decoder names (test-side)."""
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] not in ("encoder", "decoder"):
            out[k] = v
            continue
        side, rest = p[0], ".".join(p[1:])
        if p[1] == "conv_norm_out":
            n = f"{side}.norm_out.{p[2]}"
        elif p[1] == "mid_block":
            tail = ".".join(p[4:])
            if p[2] == "attentions":
                n = f"{side}.mid.attn_1.{_swap(tail, _AE_ATTN)}"
                v = v[:, :, None, None] if v.ndim == 2 else v
            else:
                n = f"{side}.mid.block_{int(p[3]) + 1}.{_swap(tail, {'conv_shortcut': 'nin_shortcut'})}"
        elif p[1] in ("down_blocks", "up_blocks"):
            lvl = int(p[2]) if p[1] == "down_blocks" else num_levels - 1 - int(p[2])
            grp = "down" if p[1] == "down_blocks" else "up"
            kind, tail = p[3], ".".join(p[5:])
            if kind == "resnets":
                n = f"{side}.{grp}.{lvl}.block.{p[4]}.{_swap(tail, {'conv_shortcut': 'nin_shortcut'})}"
            elif kind == "attentions":
                n = f"{side}.{grp}.{lvl}.attn.{p[4]}.{_swap(tail, _AE_ATTN)}"
                v = v[:, :, None, None] if v.ndim == 2 else v
            else:
                n = f"{side}.{grp}.{lvl}.{grp}sample.{tail}"
        else:
            n = f"{side}.{rest}"
        out[n] = v
    return out
