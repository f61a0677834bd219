"""CompVis (paper repository) state-dict names -> diffusers names, which our modules use.

Each function takes {compvis_name: ndarray} for one component (prefix already stripped) and returns
{diffusers_name: ndarray}; `torch_names.convert_state_dict` then places them in our trees. The fused
legacy `qkv` projections of openaimodel's AttentionBlock are split here.
"""
import re


_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_AE_RESBLOCK = {"nin_shortcut": "conv_shortcut"}
_AE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename_head(rest, table):
    """Rename the leading module path of `rest` ('in_layers.2.weight') using `table`."""
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _split_qkv(w, heads):
    """openaimodel's fused qkv (3C, C[, 1]) -> q, k, v; the legacy order groups channels per head."""
    c = w.shape[0] // 3
    grouped = w.reshape((heads, 3, c // heads) + w.shape[1:])
    return [grouped[:, i].reshape((c,) + w.shape[1:]) for i in range(3)]


def _attention_block(prefix, rest, value, heads_at, out):
    """AttentionBlock (norm, qkv, proj_out) -> diffusers Attention (group_norm, to_q/k/v, to_out.0)."""
    name, param = rest.rsplit(".", 1)
    if name == "qkv":
        c = value.shape[0] // 3
        for n, part in zip(("to_q", "to_k", "to_v"), _split_qkv(value, heads_at(c))):
            out[f"{prefix}.{n}.{param}"] = part
    elif name == "proj_out":
        out[f"{prefix}.to_out.0.{param}"] = value
    elif name == "norm":
        out[f"{prefix}.group_norm.{param}"] = value
    else:
        raise KeyError(rest)


def _is_resblock(rest):
    return rest.split(".")[0] in ("in_layers", "emb_layers", "out_layers", "skip_connection")


def _place(block, rest, value, heads_at, out, transformer_keys):
    """Put one sub-module's parameter of a UNet block (resnet / attention / resampler) in `out`."""
    if _is_resblock(rest):
        out[f"{block}.{_rename_head(rest, _RESBLOCK)}"] = value
    elif transformer_keys:
        out[f"{block}.{rest}"] = value  # SpatialTransformer already uses diffusers' names
    else:
        _attention_block(block, rest, value, heads_at, out)


def unet_to_diffusers(sd, num_res_blocks, num_levels, heads_at):
    """Map an openaimodel.UNetModel state dict onto diffusers UNet2D(Condition)Model names.

    `heads_at(ch)` gives the number of heads of an attention site with `ch` channels.
    """
    transformer = any(".transformer_blocks." in k for k in sd)
    down_of, up_of = {}, {}
    idx = 1
    for level in range(num_levels):
        for j in range(num_res_blocks):
            down_of[idx] = (f"down_blocks.{level}", j)
            idx += 1
        if level != num_levels - 1:
            down_of[idx] = (f"down_blocks.{level}", "down")
            idx += 1
    for k in range(num_levels * (num_res_blocks + 1)):
        up_of[k] = (f"up_blocks.{k // (num_res_blocks + 1)}", k % (num_res_blocks + 1))
    out = {}
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb": "class_embedding", "input_blocks.0.0": "conv_in",
             "out.0": "conv_norm_out", "out.2": "conv_out"}
    for key, value in sd.items():
        head = _rename_head(key, fixed)
        if head != key:
            out[head] = value
            continue
        m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.?(\d+)?\.(.*)", key)
        if m is None:
            raise KeyError(f"unexpected UNet parameter '{key}'")
        group, i, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if group == "middle_block":
            rest = f"{sub}.{rest}" if sub is not None else rest
            block = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[i]
            _place(block, rest, value, heads_at, out, transformer)
            continue
        sub = int(sub)
        if group == "input_blocks":
            base, j = down_of[i]
            if j == "down":
                if rest.startswith("op."):
                    out[f"{base}.downsamplers.0.conv.{rest[3:]}"] = value
                else:
                    _place(f"{base}.downsamplers.0", rest, value, heads_at, out, transformer)
                continue
            block = f"{base}.resnets.{j}" if sub == 0 else f"{base}.attentions.{j}"
        else:
            base, j = up_of[i]
            if sub == 0:
                block = f"{base}.resnets.{j}"
            elif rest.startswith("conv.") and j == num_res_blocks:
                out[f"{base}.upsamplers.0.{rest}"] = value
                continue
            elif _is_resblock(rest) and j == num_res_blocks:
                block = f"{base}.upsamplers.0"
            else:
                block = f"{base}.attentions.{j}"
        _place(block, rest, value, heads_at, out, transformer)
    return out


def autoencoder_to_diffusers(sd, num_levels):
    """Map a CompVis Encoder/Decoder (+ quant convs, codebook) onto diffusers AutoencoderKL/VQModel names."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv", "quantize"):
            out[key] = value
            continue
        if parts[0] not in ("encoder", "decoder"):
            raise KeyError(f"unexpected autoencoder parameter '{key}'")
        side, name = parts[0], parts[1]
        rest = ".".join(parts[2:])
        if name in ("conv_in", "conv_out"):
            new = f"{side}.{name}.{rest}"
        elif name == "norm_out":
            new = f"{side}.conv_norm_out.{rest}"
        elif name == "mid":
            sub, tail = rest.split(".", 1)
            if sub == "attn_1":
                new = f"{side}.mid_block.attentions.0.{_rename_head(tail, _AE_ATTN)}"
            else:
                new = f"{side}.mid_block.resnets.{int(sub[-1]) - 1}.{_rename_head(tail, _AE_RESBLOCK)}"
        elif name in ("down", "up"):
            level, kind, tail = int(parts[2]), parts[3], ".".join(parts[4:])
            blk = f"{side}.down_blocks.{level}" if name == "down" else f"{side}.up_blocks.{num_levels - 1 - level}"
            if kind == "block":
                j, tail = tail.split(".", 1)
                new = f"{blk}.resnets.{j}.{_rename_head(tail, _AE_RESBLOCK)}"
            elif kind == "attn":
                j, tail = tail.split(".", 1)
                new = f"{blk}.attentions.{j}.{_rename_head(tail, _AE_ATTN)}"
            elif kind in ("downsample", "upsample"):
                new = f"{blk}.{kind[:-6]}samplers.0.{tail}"
            else:
                raise KeyError(f"unexpected autoencoder parameter '{key}'")
        else:
            raise KeyError(f"unexpected autoencoder parameter '{key}'")
        out[new] = value
    return out


def bert_embedder_to_diffusers(sd):
    """Map an x-transformers TransformerWrapper (BERTEmbedder.transformer) onto LDMBertModel names."""
    out = {}
    for key, value in sd.items():
        if key.startswith("token_emb."):
            out["model.embed_tokens." + key.split(".", 1)[1]] = value
        elif key.startswith("pos_emb.emb."):
            out["model.embed_positions." + key.split(".", 2)[2]] = value
        elif key.startswith("norm."):
            out["model.layer_norm." + key.split(".", 1)[1]] = value
        elif key.startswith("to_logits."):
            out[key] = value
        else:
            m = re.match(r"attn_layers\.layers\.(\d+)\.(\d)\.(.*)", key)
            if m is None:
                raise KeyError(f"unexpected text-encoder parameter '{key}'")
            n, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            layer, is_ff = f"model.layers.{n // 2}", n % 2 == 1
            if part == 0:
                out[f"{layer}.{'final_layer_norm' if is_ff else 'self_attn_layer_norm'}.{rest}"] = value
            elif is_ff:
                out[f"{layer}.{_rename_head(rest, {'net.0.0': 'fc1', 'net.2': 'fc2'})}"] = value
            else:
                table = {"to_q": "self_attn.q_proj", "to_k": "self_attn.k_proj",
                         "to_v": "self_attn.v_proj", "to_out": "self_attn.out_proj"}
                out[f"{layer}.{_rename_head(rest, table)}"] = value
    return out


def ema_weights(sd, prefix="model.diffusion_model."):
    """Replace `prefix*` weights by their `model_ema.*` copies where the checkpoint has them."""
    ema = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith("model_ema.")}
    if not ema:
        return sd, False
    out = dict(sd)
    wrapper = prefix.split(".", 1)[1]  # 'diffusion_model.' (LitEma names drop the dots)
    for k in sd:
        if k.startswith(prefix):
            ema_name = (wrapper + k[len(prefix):]).replace(".", "")
            if ema_name in ema:
                out[k] = ema[ema_name]
    return out, True
