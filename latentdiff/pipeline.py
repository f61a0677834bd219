"""`LatentDiffusionPipeline`: load a released or trained LDM and sample it in one jitted program.

The program encodes the conditioning, runs every denoising step (`lax.scan`, classifier-free
guidance in one doubled batch) and decodes the latents; it is compiled once per batch shape and
sampler setting and cached.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from latentdiff import parallel
from latentdiff.diffusion import samplers
from latentdiff.diffusion.schedules import NoiseSchedule
from latentdiff.models.autoencoder import first_stage_latents
from latentdiff.models.unet import (CONTEXT_KV, PREPARED, TIME_PROJ, context_key_values, prepared_weights,
                                   time_projections)
from latentdiff.runtime import COMPILER_OPTIONS

TASKS = ("text2img", "class2img", "uncond", "superres", "inpaint", "semantic")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What a checkpoint says about sampling, beyond the modules themselves."""

    task: str = "text2img"
    scale_factor: float = 1.0
    latent_channels: int = 4
    latent_size: int = 32  # training latent resolution (height = width)
    vae_scale: int = 8  # image pixels per latent pixel
    null_class: Optional[int] = None  # label meaning "no class" for guidance (cin256-v2: 1000)
    prediction_type: str = "eps"
    # A diffusers scheduler_config's settings, applied when sampling with that scheduler's sampler;
    # other samplers (and CompVis checkpoints) use each sampler's paper defaults.
    scheduler: Optional[str] = None
    spacing: Optional[str] = None
    steps_offset: Optional[int] = None
    set_alpha_to_one: Optional[bool] = None
    max_length: int = 77

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task '{self.task}'; one of {TASKS}")


class LatentDiffusionPipeline:
    """A latent diffusion model ready to sample: modules, their parameters and the noise schedule."""

    def __init__(self, *, unet, vae, schedule: NoiseSchedule, config: PipelineConfig, params,
                 cond_model=None, tokenizer=None, devices=None):
        self.unet, self.vae, self.cond_model, self.tokenizer = unet, vae, cond_model, tokenizer
        self.schedule, self.config = schedule, config
        self.params = params  # {'unet': ..., 'vae': ..., 'cond': ... (optional)}
        self._programs = {}
        self.devices = devices  # what a batch is split over; None: every device of every process
        self._replicated = None  # (params, devices, their replicated copy) when sampling over a mesh

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, config=None, *, dtype=jnp.float32, param_dtype=jnp.float32, use_ema=True):
        """Load a diffusers LDM folder, a CompVis `.ckpt` (with `config=` its YAML) or our own checkpoint.

        `dtype`: the compute dtype. `param_dtype`: how the weights are stored; bfloat16 halves their
        memory and each step's reads of them (the matmuls and convolutions cast them to bfloat16
        anyway; the norms' scales and biases, computed in float32, keep bfloat16's rounding)."""
        from latentdiff.convert import loaders

        return cls(**loaders.load(path, config=config, dtype=dtype, use_ema=use_ema, param_dtype=param_dtype))

    def save_pretrained(self, path):
        """Write this pipeline in the project's own format (loadable by `from_pretrained`)."""
        from latentdiff.convert import loaders

        loaders.save(self, path)

    # ------------------------------------------------------------------ sampling
    def __call__(self, prompts=None, *, class_labels=None, image=None, mask=None, rng=None,
                 num_inference_steps=50, guidance_scale=1.0, eta=0.0, sampler="ddim",
                 latents=None, height=None, width=None, num_samples=None, output_type="uint8",
                 negative_prompt=None):
        """Sample images; returns uint8 (B, H, W, 3). See DESIGN.md for the keywords.

        `output_type='float'` gives [0, 1] float32 images, `'latents'` the final latents (NHWC).
        `negative_prompt` (text models, with guidance): the text guidance steers away from in place
        of the empty prompt, one for all images or a list of one per prompt. A text shared by every
        image (the empty one by default) is encoded once.
        """
        cfg = self.config
        if output_type not in ("uint8", "float", "latents"):
            raise ValueError(f"output_type must be 'uint8', 'float' or 'latents', got '{output_type}'")
        if num_samples is None and latents is not None:
            num_samples = np.shape(latents)[0]
        cond, uncond, batch = self._conditioning(prompts, class_labels, image, mask, num_samples,
                                                 negative_prompt)
        guided = float(guidance_scale) != 1.0
        if guided and uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional input, which the "
                             f"'{cfg.task}' task does not have; use guidance_scale=1.0")
        if negative_prompt is not None and not guided:
            raise ValueError("negative_prompt acts through guidance: set guidance_scale other than 1.0")
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler '{sampler}'; one of {samplers.SAMPLERS}")
        h, w = self._latent_hw(height, width, image)
        shape = (batch, h, w, cfg.latent_channels)
        if latents is None:
            if rng is None:
                raise ValueError("pass rng=jax.random.key(seed) or latents= to sample")
            rng, sub = jax.random.split(rng)
            latents = jax.random.normal(sub, shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise ValueError(f"latents must have shape {shape} (NHWC), got {latents.shape}")
        if rng is None:
            rng = jax.random.key(0)
        key = (sampler, int(num_inference_steps), float(eta), guided, shape)
        if key not in self._programs:
            self._programs[key] = self._build_program(sampler, int(num_inference_steps), float(eta), guided)
        cond, uncond, latents = self._split_over_devices((cond, uncond, latents))
        z, images = self._programs[key](self._placed_params(), cond, uncond, latents, rng,
                                        jnp.float32(guidance_scale))
        if output_type == "latents":
            return parallel.to_host(z)
        if output_type == "float":
            return parallel.to_host(images)
        return parallel.to_host(jnp.round(images * 255.0).astype(jnp.uint8))

    def _latent_hw(self, height, width, image):
        cfg = self.config
        scale = 1 if cfg.task == "superres" else cfg.vae_scale  # input pixels per latent pixel
        unit = scale * self.unet.config.size_multiple
        if cfg.task in ("superres", "inpaint", "semantic"):
            height, width = np.shape(image)[1:3]
            what = "the image's height and width"
        else:
            pix = cfg.latent_size * cfg.vae_scale
            height, width = height or pix, width or pix
            what = "height and width"
        if height % unit or width % unit:
            raise ValueError(f"{what} must be multiples of {unit} for this model, "
                             f"got {height}x{width}")
        return height // scale, width // scale

    def _conditioning(self, prompts, class_labels, image, mask, num_samples, negative_prompt=None):
        """Host-side inputs of the program: (cond, uncond, batch size). The unconditional input is one
        row when every image shares it (the empty or one negative prompt, the null class): the program
        encodes it once and broadcasts the encoding."""
        cfg = self.config
        if negative_prompt is not None and cfg.task != "text2img":
            raise ValueError(f"negative_prompt is for text-to-image models, not this '{cfg.task}' one")
        if cfg.task == "text2img":
            if prompts is None:
                raise ValueError("this is a text-to-image model: pass prompts")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            negative = negative_prompt or ""
            negative = [negative] if isinstance(negative, str) else list(negative)
            if len(negative) != len(prompts) and len(negative) != 1:
                raise ValueError(f"negative_prompt: give one text or one per prompt ({len(prompts)}), "
                                 f"got {len(negative)}")
            negative = negative[:1] if len(set(negative)) == 1 else negative
            ids = self.tokenizer.encode(prompts, max_length=cfg.max_length)
            null = self.tokenizer.encode(negative, max_length=cfg.max_length)
            return jnp.asarray(ids), jnp.asarray(null), len(prompts)
        if cfg.task == "class2img":
            if class_labels is None:
                raise ValueError("this is a class-conditional model: pass class_labels")
            labels = np.asarray(class_labels, np.int32).reshape(-1)
            n = self.cond_model.n_classes
            if labels.min() < 0 or labels.max() >= n:
                raise ValueError(f"class_labels must lie in [0, {n}), got {labels.tolist()}")
            null = None if cfg.null_class is None else np.full((1,), cfg.null_class, labels.dtype)
            return jnp.asarray(labels), None if null is None else jnp.asarray(null), len(labels)
        if cfg.task == "uncond":
            return None, None, int(num_samples or 1)
        if image is None:
            raise ValueError(f"the '{cfg.task}' task needs image=")
        image = np.asarray(image)
        if cfg.task == "semantic":
            return jnp.asarray(image, jnp.float32), None, image.shape[0]
        image = _to_unit_range(image)
        if cfg.task == "superres":
            return jnp.asarray(image), None, image.shape[0]
        if mask is None:
            raise ValueError("inpainting needs mask= (1 where to fill in)")
        mask = np.asarray(mask, np.float32)
        mask = mask[..., None] if mask.ndim == 3 else mask
        if mask.shape[:3] != image.shape[:3] or mask.shape[-1] != 1:
            raise ValueError(f"mask must have shape {image.shape[:3]} (+ optional 1 channel) to "
                             f"match the image, got {mask.shape}")
        return (jnp.asarray(image), jnp.asarray((mask >= 0.5).astype(np.float32))), None, image.shape[0]

    # ------------------------------------------------------------------ devices
    def _mesh(self):
        """A 1-D mesh over `self.devices` (default: every device of every process), or None when
        there is one device in all."""
        if self.devices is None and jax.device_count() == 1:
            return None
        return jax.sharding.Mesh(np.array(jax.devices() if self.devices is None else list(self.devices)), ("batch",))

    def _placed_params(self):
        """The parameters, replicated over the mesh once (as they are with one device)."""
        mesh = self._mesh()
        if mesh is None:
            return self.params
        if self._replicated is None or self._replicated[0] is not self.params or self._replicated[1] != mesh:
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._replicated = (self.params, mesh, parallel.put_global(self.params, sharding))
        return self._replicated[2]

    def _split_over_devices(self, tree):
        """Batch-leading inputs split over the devices (jit then runs each device's share); a batch
        the device count does not divide is replicated instead. Every process passes the same
        inputs (same prompts, same seed) and places its own devices' share."""
        mesh = self._mesh()
        if mesh is None:
            return tree
        P, n = jax.sharding.PartitionSpec, mesh.size

        def put(x):
            spec = P("batch") if x.ndim and x.shape[0] % n == 0 else P()
            return parallel.put_global(x, jax.sharding.NamedSharding(mesh, spec))

        return jax.tree_util.tree_map(put, tree)

    # ------------------------------------------------------------------ the jitted program
    def _build_program(self, sampler, num_steps, eta, guided):
        cfg, unet, vae, cond_model = self.config, self.unet, self.vae, self.cond_model
        schedule = self.schedule
        kwargs = dict(prediction_type=cfg.prediction_type)
        if sampler == cfg.scheduler:  # the checkpoint's own scheduler settings (diffusers folders)
            kwargs.update(spacing=cfg.spacing, steps_offset=cfg.steps_offset,
                          set_alpha_to_one=cfg.set_alpha_to_one)

        def encode_cond(params, c):
            """Conditioning input -> (context for cross-attention, channels to concatenate)."""
            if cfg.task in ("text2img", "class2img"):
                return cond_model.apply({"params": params["cond"]}, c), None
            if cfg.task == "superres":
                return None, c
            if cfg.task == "semantic":
                return None, cond_model.apply({"params": params["cond"]}, c)
            if cfg.task == "inpaint":  # as scripts/inpaint.py: hole = -1 in the image, mask in {-1, 1}
                img, m = c
                masked = first_stage_latents(vae, params["vae"], (1.0 - m) * (img + 1.0) - 1.0)
                small = _resize_nearest(2.0 * m - 1.0, masked.shape[1:3])
                return None, jnp.concatenate([masked, small], axis=-1)
            return None, None

        def program(params, cond, uncond, x_T, rng, guidance_scale):
            ctx, concat = encode_cond(params, cond)
            if guided:
                uctx, _ = encode_cond(params, uncond)  # one row when every image shares it
                ctx = jnp.concatenate([jnp.broadcast_to(uctx, ctx.shape), ctx], axis=0)

            model_fn = guided_model_fn(unet, params["unet"], ctx, guidance_scale if guided else None, concat)
            z = samplers.sample(model_fn, x_T, schedule, sampler=sampler, num_steps=num_steps,
                                eta=eta, rng=rng, **kwargs)
            x = vae.apply({"params": params["vae"]}, z / cfg.scale_factor, method="decode")
            x = jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
            if cfg.task == "inpaint":
                img, m = cond
                x = (1.0 - m) * (img + 1.0) / 2.0 + m * x
            return z, x

        return jax.jit(program, compiler_options=COMPILER_OPTIONS)


def guided_model_fn(unet, unet_params, ctx, guidance_scale=None, concat=None):
    """The sampler's model_fn(x, t): the UNet with classifier-free guidance, unconditional and
    conditional rows in one batch (`ctx` holds the unconditional rows first) combined as
    u + scale * (c - u); with `guidance_scale` None, the UNet once. `concat`: channels appended to x.
    Guidance needs the context: x enters the UNet once for both, each row beside its two (`ctx`
    interleaved once), and the rows part ways at the first cross-attention (see `UNet`).
    The context's keys and values are projected once, here, for every layer
    (`unet.context_key_values`), the time embedding's projections once, before the loop, for
    every step (`model_fn.per_step`, which `samplers.sample` calls: `unet.time_projections`), and
    what the layers derive from their weights alone once (`unet.prepared_weights`)."""
    if guidance_scale is not None:
        if ctx is None:  # both halves would see the same input: guidance would return c itself
            raise ValueError("guidance needs a context whose unconditional rows come first")
        ctx = jnp.stack(jnp.split(ctx, 2), axis=1).reshape((-1,) + ctx.shape[1:])  # each row's two side by side
    variables = {"params": unet_params, PREPARED: prepared_weights(unet, unet_params)}
    if ctx is not None:
        variables[CONTEXT_KV] = context_key_values(unet, unet_params, ctx)

    def model_fn(x, t, step=None):
        xin = x if concat is None else jnp.concatenate([x, concat.astype(x.dtype)], -1)
        out = unet.apply(variables if step is None else {**variables, TIME_PROJ: step}, xin, t, ctx)
        out = out.astype(jnp.float32)
        if guidance_scale is None:
            return out
        out = out.reshape((-1, 2) + out.shape[1:])  # x once for both contexts (see `UNet`): rows 2j, 2j + 1
        out_u, out_c = out[:, 0], out[:, 1]
        return out_u + guidance_scale * (out_c - out_u)

    def per_step(ts):  # one row per step: every row of a step shares its timestep
        return jax.tree.map(lambda e: e[:, None], time_projections(unet, unet_params, ts))

    model_fn.per_step = per_step
    return model_fn


def _resize_nearest(x, hw):
    """NHWC resize to `hw` as torch's `F.interpolate(x, size=hw)` (mode 'nearest'): source index
    floor(i * in / out). (`jax.image.resize` samples pixel centres, which picks other pixels.)"""
    for axis, n in zip((1, 2), hw):
        idx = np.floor(np.arange(n, dtype=np.float32) * np.float32(x.shape[axis] / n)).astype(np.int64)
        x = jnp.take(x, np.minimum(idx, x.shape[axis] - 1), axis=axis)
    return x


def _to_unit_range(image):
    """uint8 [0,255] or float [-1,1] NHWC images -> float32 [-1, 1]."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image must be NHWC with 3 channels, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 127.5 - 1.0
    return image.astype(np.float32)
