"""`from_pretrained` sources: a diffusers LDM folder, a CompVis `.ckpt` + YAML, our own checkpoint.

Each loader returns the keyword arguments of `LatentDiffusionPipeline`: modules, parameter trees
(converted by `torch_names.convert_state_dict`, which names the first mismatching parameter), the
noise schedule and the `PipelineConfig`.
"""
import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from latentdiff.convert import compvis
from latentdiff.convert.torch_names import convert_state_dict, load_state_dict
from latentdiff.diffusion import samplers
from latentdiff.diffusion.schedules import NoiseSchedule
from latentdiff.models.autoencoder import AutoencoderConfig, make_autoencoder
from latentdiff.models.conditioning import ClassEmbedder, SpatialRescaler
from latentdiff.models.text import LDMBert, TextEncoderConfig
from latentdiff.models.tokenizer import BertTokenizer
from latentdiff.models.unet import UNet, UNetConfig

OWN_CONFIG = "latentdiff.json"
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin")
_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def load(path, config=None, dtype=jnp.float32, use_ema=True, param_dtype=jnp.float32):
    """Dispatch on what `path` is; see the module docstring. The parameters are stored in
    `param_dtype` (cast on the host where they are read from files)."""
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise ValueError(f"param_dtype must be a floating dtype, got {param_dtype!r}")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "pipeline", OWN_CONFIG)):  # a training run's workdir
            path = os.path.join(path, "pipeline")
        if os.path.exists(os.path.join(path, OWN_CONFIG)):
            return load_own(path, dtype, use_ema, param_dtype)
        if os.path.exists(os.path.join(path, "model_index.json")):
            return load_diffusers(path, dtype, param_dtype)
        raise FileNotFoundError(f"{path} holds neither model_index.json (diffusers) nor {OWN_CONFIG}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if config is None:
        guess = os.path.splitext(path)[0] + ".yaml"
        config = guess if os.path.exists(guess) else None
    if config is None:
        raise ValueError(f"a CompVis checkpoint needs its YAML: from_pretrained('{path}', config='config.yaml')")
    return load_compvis(path, config, dtype, use_ema, param_dtype)


# ---------------------------------------------------------------------------- shared pieces
def abstract_params(module, *args, **kwargs):
    """Parameter shapes of `module` for the given example inputs, without allocating them."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]


def unet_example(unet, latent_hw=8):
    cfg = unet.config
    x = jnp.zeros((1, latent_hw, latent_hw, cfg.in_channels))
    t = jnp.zeros((1,), jnp.int32)
    ctx = jnp.zeros((1, 1, cfg.context_dim)) if cfg.context_dim else None
    y = jnp.zeros((1,), jnp.int32) if cfg.num_classes else None
    return (x, t, ctx, y)


def _convert_unet(unet, sd):
    size = unet.config.size_multiple
    return convert_state_dict(sd, abstract_params(unet, *unet_example(unet, size)), prefix="unet")


def _convert_vae(vae, sd):
    size = 2 ** len(vae.config.ch_mult)
    x = jnp.zeros((1, size, size, vae.config.in_channels))
    return convert_state_dict(_modern_attention_names(sd), abstract_params(vae, x),
                              ignore=("loss.",), prefix="first stage")


def _convert_text(model, sd):
    ids = jnp.zeros((1, model.config.max_length), jnp.int32)
    return convert_state_dict(sd, abstract_params(model, ids), ignore=("to_logits.",),
                              prefix="text encoder")


def _modern_attention_names(sd):
    """diffusers' old attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0."""
    return {_LEGACY_ATTENTION.sub(lambda m: m.group(1) + _LEGACY_NAMES[m.group(2)] + ".", k): v
            for k, v in sd.items()}


def _as_device(tree, dtype=jnp.float32):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


# ---------------------------------------------------------------------------- diffusers
def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _component_state_dict(folder):
    for name in _WEIGHT_FILES:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            return load_state_dict(p)
    raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(_WEIGHT_FILES)}")


def load_diffusers(path, dtype=jnp.float32, param_dtype=jnp.float32):
    """A diffusers LDMTextToImagePipeline / LDMPipeline / LDMSuperResolutionPipeline folder."""
    from latentdiff.pipeline import PipelineConfig

    kind = _read_json(os.path.join(path, "model_index.json"))["_class_name"]
    supported = {"LDMTextToImagePipeline": "text2img", "LDMPipeline": "uncond",
                 "LDMSuperResolutionPipeline": "superres"}
    if kind not in supported:
        raise ValueError(f"{path} is a {kind}; latentdiff loads {', '.join(supported)}")
    task = supported[kind]
    vae_cfg = _read_json(os.path.join(path, "vqvae", "config.json"))
    ae = AutoencoderConfig.from_diffusers(vae_cfg, "vq" if vae_cfg["_class_name"] == "VQModel" else "kl")
    vae = make_autoencoder(ae, dtype=dtype)
    unet_cfg = _read_json(os.path.join(path, "unet", "config.json"))
    unet = UNet(UNetConfig.from_diffusers(unet_cfg), dtype=dtype)
    sched = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    params = {"vae": _convert_vae(vae, _component_state_dict(os.path.join(path, "vqvae"))),
              "unet": _convert_unet(unet, _component_state_dict(os.path.join(path, "unet")))}
    cond_model = tokenizer = None
    if task == "text2img":
        cond_model = LDMBert(TextEncoderConfig.from_diffusers(
            _read_json(os.path.join(path, "bert", "config.json"))), dtype=dtype)
        params["cond"] = _convert_text(cond_model, _component_state_dict(os.path.join(path, "bert")))
        tokenizer = BertTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    in_ch = unet.config.in_channels
    config = PipelineConfig(
        task=task,
        scale_factor=_diffusers_scale_factor(vae_cfg, task),
        latent_channels=in_ch // 2 if task == "superres" else in_ch,
        latent_size=int(unet_cfg.get("sample_size") or 32),
        vae_scale=2 ** (len(ae.ch_mult) - 1),
        **_scheduler_settings(sched))
    return dict(unet=unet, vae=vae, cond_model=cond_model, tokenizer=tokenizer,
                schedule=NoiseSchedule.from_diffusers(sched), config=config, params=_as_device(params, param_dtype))


def _diffusers_scale_factor(vae_cfg, task):
    """What the diffusers pipeline divides latents by before decoding. LDMTextToImagePipeline and
    LDMPipeline use `vqvae.config.scaling_factor`, super-resolution nothing. Where an LDMPipeline
    folder (e.g. the released ldm-celebahq-256) has no `scaling_factor`, the paper's VQ value 1.0 is
    used, not diffusers' default 0.18215 (diffusers issue #6725)."""
    if task == "text2img":
        return float(vae_cfg.get("scaling_factor", 0.18215))
    if task == "uncond":
        return float(vae_cfg.get("scaling_factor", 1.0))
    return 1.0


def _scheduler_settings(sched):
    kw = samplers.sampler_kwargs_from_diffusers(sched)
    kw["scheduler"] = kw.pop("sampler")
    return kw


# ---------------------------------------------------------------------------- CompVis
def _yaml(path):
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _split_prefix(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def build_ldm(p, dtype=jnp.float32, scale_factor=None):
    """Modules, schedule and `PipelineConfig` of a CompVis `LatentDiffusion` params dict (no weights).

    `p` is the YAML's `model.params` (training configs use the same layout). Returns a dict with
    unet, vae, cond_model (or None), schedule, config, and `cond_target` (the cond stage's kind).
    """
    from latentdiff.pipeline import PipelineConfig

    fs = p["first_stage_config"]
    ae = AutoencoderConfig.from_compvis(fs["params"]["ddconfig"], fs["params"]["embed_dim"],
                                        fs["params"].get("n_embed"))
    vae = make_autoencoder(dataclasses.replace(ae, kind="vq" if "VQ" in fs["target"] else "kl"), dtype=dtype)
    ucfg = UNetConfig.from_compvis(p["unet_config"]["params"])
    cond_model, null_class = None, None
    cs = p.get("cond_stage_config", "__is_unconditional__")
    cs_target = cs if isinstance(cs, str) else cs["target"]
    cs_params = {} if isinstance(cs, str) else dict(cs.get("params", {}) or {})
    key = p.get("conditioning_key") or ("concat" if p.get("concat_mode", True) else "crossattn")
    if cs_target == "__is_unconditional__":
        task = "uncond"
    elif cs_target.endswith("ClassEmbedder"):
        n = int(cs_params.get("n_classes", 1000))
        cond_model = ClassEmbedder(n_classes=n, embed_dim=int(cs_params["embed_dim"]), dtype=dtype)
        task, null_class = "class2img", (n - 1 if n == 1001 else None)
    elif cs_target.endswith("BERTEmbedder"):
        cond_model = LDMBert(TextEncoderConfig.from_compvis(cs_params), dtype=dtype)
        task = "text2img"
    elif cs_target.endswith("SpatialRescaler"):
        cond_model = SpatialRescaler(**cs_params, dtype=dtype)
        task = "semantic"
    elif cs_target == "__is_first_stage__":
        task = "inpaint"
    elif cs_target.endswith("Identity") and key == "concat":
        task = "superres"
    else:
        raise ValueError(f"unsupported cond_stage_config target '{cs_target}' (conditioning_key {key})")
    schedule = NoiseSchedule.from_config(p.get("beta_schedule", "linear"), int(p.get("timesteps", 1000)),
                                         float(p.get("linear_start", 1e-4)), float(p.get("linear_end", 2e-2)))
    config = PipelineConfig(
        task=task, scale_factor=float(p.get("scale_factor", 1.0) if scale_factor is None else scale_factor),
        latent_channels=int(p.get("channels", ucfg.out_channels)),
        latent_size=int(p.get("image_size", 32)), vae_scale=2 ** (len(ae.ch_mult) - 1),
        null_class=null_class, prediction_type=p.get("parameterization", "eps"),
        max_length=cond_model.config.max_length if isinstance(cond_model, LDMBert) else 77)
    return dict(unet=UNet(ucfg, dtype=dtype), vae=vae, cond_model=cond_model, schedule=schedule,
                config=config, cond_target=cs_target)


def load_compvis(ckpt, yaml_path, dtype=jnp.float32, use_ema=True, param_dtype=jnp.float32):
    """A CompVis LatentDiffusion `.ckpt` with the YAML it was released with."""
    p = _yaml(yaml_path)["model"]["params"]
    sd = load_state_dict(ckpt)
    if use_ema:
        sd, _ = compvis.ema_weights(sd)
    scale = float(np.asarray(sd["scale_factor"])) if "scale_factor" in sd else None
    spec = build_ldm(p, dtype, scale)
    unet, vae, cond_model = spec["unet"], spec["vae"], spec["cond_model"]
    vae_sd = compvis.autoencoder_to_diffusers(
        {k: v for k, v in _split_prefix(sd, "first_stage_model.").items() if not k.startswith("loss.")},
        len(vae.config.ch_mult))
    ucfg = unet.config
    unet_sd = compvis.unet_to_diffusers(
        _split_prefix(sd, "model.diffusion_model."), ucfg.num_res_blocks, len(ucfg.channel_mult),
        lambda ch: ucfg.heads_at(0, ch)[0])
    params = {"vae": _convert_vae(vae, vae_sd), "unet": _convert_unet(unet, unet_sd)}
    tokenizer = None
    if isinstance(cond_model, LDMBert):
        params["cond"] = _convert_text(cond_model, compvis.bert_embedder_to_diffusers(
            _split_prefix(sd, "cond_stage_model.transformer.")))
        tokenizer = _tokenizer_beside(ckpt, yaml_path)
    elif cond_model is not None:
        params["cond"] = convert_state_dict(_split_prefix(sd, "cond_stage_model."),
                                            abstract_params(cond_model, *cond_example(cond_model)),
                                            prefix="conditioning model")
    return dict(unet=unet, vae=vae, cond_model=cond_model, tokenizer=tokenizer, schedule=spec["schedule"],
                config=spec["config"], params=_as_device(params, param_dtype))


def load_first_stage(path, vae):
    """First-stage weights for LDM training: our autoencoder run (its `autoencoder/params`), a
    CompVis first-stage `.ckpt` (encoder.*, decoder.*, quant convs), or a diffusers vqvae/vae folder."""
    import orbax.checkpoint as ocp

    own = os.path.join(path, "autoencoder", "params")
    if os.path.isdir(own):
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(os.path.abspath(own))
    if os.path.isdir(path):
        return _convert_vae(vae, _component_state_dict(path))
    sd = load_state_dict(path)
    sd = _split_prefix(sd, "first_stage_model.") or sd
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    return _convert_vae(vae, compvis.autoencoder_to_diffusers(sd, len(vae.config.ch_mult)))


def cond_example(cond_model):
    """Example inputs of a conditioning model (for shape-only initialisation)."""
    if isinstance(cond_model, ClassEmbedder):
        return (jnp.zeros((1,), jnp.int32),)
    if isinstance(cond_model, LDMBert):
        return (jnp.zeros((1, cond_model.config.max_length), jnp.int32),)
    side = 2 ** (cond_model.n_stages + 2)
    return (jnp.zeros((1, side, side, cond_model.in_channels)),)


def _tokenizer_beside(*paths):
    for p in paths:
        vocab = os.path.join(os.path.dirname(os.path.abspath(p)), "vocab.txt")
        if os.path.exists(vocab):
            return BertTokenizer(vocab)
    raise FileNotFoundError(
        "this text-to-image checkpoint tokenises with BERT's WordPiece vocabulary: put bert-base-uncased's "
        f"vocab.txt (from the Hugging Face model 'bert-base-uncased') next to {paths[0]}")


# ---------------------------------------------------------------------------- our own format
def save(pipe, path):
    """Write configs as JSON and parameters with orbax, plus the tokenizer's vocab.txt."""
    os.makedirs(path, exist_ok=True)
    cond = None
    if pipe.cond_model is not None:
        cond = {"type": type(pipe.cond_model).__name__,
                "config": _fields(getattr(pipe.cond_model, "config", pipe.cond_model))}
    meta = {"pipeline": dataclasses.asdict(pipe.config), "unet": dataclasses.asdict(pipe.unet.config),
            "vae": dataclasses.asdict(pipe.vae.config), "cond": cond,
            "betas": [float(b) for b in np.asarray(pipe.schedule.betas)]}
    with open(os.path.join(path, OWN_CONFIG), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    if pipe.tokenizer is not None:
        pipe.tokenizer.save_vocab(os.path.join(path, "vocab.txt"))
    write_params(os.path.join(path, "params"), pipe.params)


def write_params(target, params):
    """Parameters as an orbax checkpoint at `target` (replaced if there), written by this process
    alone: in a multi-process run, process 0 exports the host copies it gathered."""
    import orbax.checkpoint as ocp

    target = os.path.abspath(target)
    if os.path.exists(target):
        shutil.rmtree(target)
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
        ckptr.save(target, jax.device_get(params))


def _fields(obj):
    """Constructor fields of a config dataclass or a flax module (dtype fields left out)."""
    if dataclasses.is_dataclass(obj) and not hasattr(obj, "apply"):
        return dataclasses.asdict(obj)
    names = [f.name for f in dataclasses.fields(obj)
             if f.name not in ("parent", "name", "dtype", "param_dtype")]
    return {n: getattr(obj, n) for n in names}


def _tuples(d):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def load_own(path, dtype=jnp.float32, use_ema=True, param_dtype=jnp.float32):
    """Our own format: `latentdiff.json` + orbax parameters (EMA parameters preferred when present)."""
    import orbax.checkpoint as ocp
    from latentdiff.pipeline import PipelineConfig

    meta = _read_json(os.path.join(path, OWN_CONFIG))
    unet = UNet(UNetConfig(**_tuples(meta["unet"])), dtype=dtype)
    vae = make_autoencoder(AutoencoderConfig(**_tuples(meta["vae"])), dtype=dtype)
    cond_model, tokenizer = None, None
    if meta["cond"]:
        kind, cfg = meta["cond"]["type"], meta["cond"]["config"]
        if kind == "LDMBert":
            cond_model = LDMBert(TextEncoderConfig(**_tuples(cfg)), dtype=dtype)
            tokenizer = BertTokenizer(os.path.join(path, "vocab.txt"))
        elif kind == "ClassEmbedder":
            cond_model = ClassEmbedder(**cfg, dtype=dtype)
        elif kind == "SpatialRescaler":
            cond_model = SpatialRescaler(**cfg, dtype=dtype)
        else:
            raise ValueError(f"unknown conditioning model '{kind}' in {path}")
    names = ["params_ema", "params"] if use_ema else ["params"]
    folder = next((os.path.join(path, n) for n in names if os.path.exists(os.path.join(path, n))), None)
    if folder is None:
        raise FileNotFoundError(f"no parameters in {path} (expected a 'params' folder)")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.abspath(folder))
    schedule = NoiseSchedule(np.asarray(meta["betas"], np.float64))
    return dict(unet=unet, vae=vae, cond_model=cond_model, tokenizer=tokenizer, schedule=schedule,
                config=PipelineConfig(**meta["pipeline"]), params=_as_device(params, param_dtype))
