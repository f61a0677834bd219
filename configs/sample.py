"""Settings of `sample.py`; override any of them: `--config.prompts='a red circle at the top left'`."""
import ml_collections

from configs import base_ldm


def get_config():
    c = ml_collections.ConfigDict()
    # our checkpoint or training workdir, a diffusers folder, or a CompVis .ckpt (with `config`, its YAML)
    c.pretrained = "workdir/demo"
    c.config = ""
    c.use_ema = True
    c.dtype = "float32"  # or bfloat16
    c.param_dtype = ""  # how the weights are stored: "" = as dtype (bfloat16 halves their memory), or float32
    # What to sample. Text models: `prompts` ('|' between prompts) or `prompts_file` (one per line);
    # without either, the built-in demo's held-out prompts. Class models: `class_labels` ("0,4,8";
    # default: every class, up to 16). Super-resolution / inpainting / semantic maps: `image` (a file
    # or a folder of them) and, for inpainting, `mask` (white = fill in; one per image).
    c.prompts = ""
    c.prompts_file = ""
    c.negative_prompt = ""  # text models with guidance: what to steer away from (default: the empty prompt)
    c.class_labels = ""
    c.image = ""
    c.mask = ""
    c.num_samples = 1  # per prompt / label / image; for an unconditional model, how many in all
    # How. guidance_scale -1: 3.0 where the model has an unconditional input (text, class), else 1.0.
    c.sampler = "ddim"  # ddim, plms, ddpm, dpm_solver++
    c.num_inference_steps = 50
    c.guidance_scale = -1.0
    c.eta = 0.0
    c.seed = 0
    c.batch_size = 16  # images per jitted call, split over all devices (rounded up to a multiple of them)
    c.height = 0  # 0: the model's training size (text, class and unconditional models)
    c.width = 0
    c.outdir = "samples"  # one PNG per sample, grid.png, and index.txt (file -> prompt / label / input)
    # several processes (hosts) sample one batch together, as train.py trains: see README
    c.distributed = base_ldm.get_config().distributed
    return c
