"""PyTorch peers of the other models that `bench.py` trains, timed the way the reference peer
(`../shared/bench/peer_torch.py`) times the txt2img UNet: bf16 autocast, eager and `torch.compile`,
each step waited for (`torch.cuda.synchronize`), median after warm-up.

- cin256-v2 (`configs/cin256_v2.py`): diffusers' `UNet2DConditionModel` with one attention head per
  site, cross-attention over the class embedding (a context of one 512-wide token, which
  `ClassEmbedder` gives) on 64x64x3 latents, AdamW; 400.9M parameters, our UNet's architecture
  (`UNetConfig.from_diffusers` of it equals the config's UNet, a test checks).
- KL-f8 (`configs/kl_f8.py`) with its losses: diffusers' `AutoencoderKL`, taming's LPIPS and
  PatchGAN below (the references of our parity tests), CompVis' `LPIPSWithDiscriminator` step after
  `disc_start` (L1 + LPIPS + KL, the adaptive GAN weight from the decoder's last layer), then the
  discriminator's hinge step on the updated autoencoder's reconstructions, Adam(4.5e-6, 0.5, 0.9).
"""
import json
import time

import torch
from torch import nn

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class TorchVGG(nn.Module):
    """torchvision's vgg16 layout: state-dict keys `features.N.*` (plus a stub classifier)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                conv = nn.Conv2d(c, v, 3, padding=1)
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.uniform_(conv.bias, -0.1, 0.1)
                layers += [conv, nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(8, 2))


class TorchLin(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        nn.init.uniform_(self.model[1].weight, 0.0, 0.1)


class TorchLPIPS(nn.Module):
    """taming's LPIPS forward: scaling, VGG slices, unit-normalise, squared diff, lin, mean, sum."""

    def __init__(self):
        super().__init__()
        self.net = TorchVGG()
        for i, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{i}", TorchLin(c))
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

    def taps(self, x):
        out, h = [], (x - self.shift) / self.scale
        for a, b in ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)):
            h = self.net.features[a:b](h)
            out.append(h)
        return out

    def forward(self, x0, x1):
        def unit(f):
            return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)

        val = 0
        for i, (f0, f1) in enumerate(zip(self.taps(x0), self.taps(x1))):
            d = (unit(f0) - unit(f1)) ** 2
            val = val + getattr(self, f"lin{i}").model(d).mean([2, 3], keepdim=True)
        return val


def torch_discriminator(ndf=64, n_layers=3):
    """taming's NLayerDiscriminator with weights_init."""
    seq = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    seq.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
    d = nn.Module()
    d.main = nn.Sequential(*seq)
    d.forward = d.main.forward
    for m in d.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.constant_(m.bias, 0)
    return d


# the full-size models, and the same structures shrunk for a CPU (smoke)
CIN256_V2 = dict(in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960),
                 down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                 up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
                 layers_per_block=2, attention_head_dim=1, cross_attention_dim=512)
CIN256_V2_SMOKE = dict(CIN256_V2, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                       cross_attention_dim=32, norm_num_groups=8)
MODELS = {"cin256": (CIN256_V2, 64, (1, 512)), "cin256_smoke": (CIN256_V2_SMOKE, 8, (1, 32))}
KL_F8 = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             latent_channels=4)
AUTOENCODERS = {"kl_f8": (KL_F8, 256),
                "kl_f8_smoke": (dict(KL_F8, block_out_channels=(32,) * 4, layers_per_block=1), 32)}


def build_unet(name):
    """The diffusers UNet of `MODELS[name]`, its latent size and its context's (tokens, width)."""
    import diffusers

    kwargs, size, context = MODELS[name]
    return diffusers.UNet2DConditionModel(sample_size=size, **kwargs), size, context


def build_autoencoder(name):
    """The diffusers AutoencoderKL of `AUTOENCODERS[name]` and its image size."""
    import diffusers

    kwargs, size = AUTOENCODERS[name]
    return diffusers.AutoencoderKL(sample_size=size, **kwargs), size


def _device():
    """The GPU if there is one (TF32 and cuDNN autotuning on, as the reference peer), else the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    return "cuda" if torch.cuda.is_available() else "cpu"


def _median_seconds(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _report(name, compile_, batch, params, seconds):
    print(json.dumps(dict(what=f"train_step_{name}", compile=compile_, batch=batch, params_M=round(params / 1e6, 1),
                          step_s=round(seconds, 4), img_per_s=round(batch / seconds, 1))), flush=True)


def bench_train(name, batch, compile_, warmup=3, reps=10):
    """One JSON line: the train step (eps loss, AdamW) of `name`'s UNet at `batch`, as the reference
    peer measures its own."""
    device = _device()
    model, size, (tokens, width) = build_unet(name)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run = torch.compile(model) if compile_ else model
    x = torch.randn(batch, model.config.in_channels, size, size, device=device)
    ctx = torch.randn(batch, tokens, width, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    eps = torch.randn_like(x)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = run(x, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(out.float(), eps)
        loss.backward()
        opt.step()

    seconds = _median_seconds(step, warmup + 2 * compile_, reps)
    _report(name, compile_, batch, sum(p.numel() for p in model.parameters()), seconds)


def bench_train_autoencoder(name, batch, compile_, warmup=3, reps=10, kl_weight=1e-6, disc_weight=0.5):
    """One JSON line: the KL autoencoder's generator step and the discriminator's step (module
    docstring) at `batch` images, as the reference peer measures its UNet's."""
    device = _device()
    vae, size = build_autoencoder(name)
    vae = vae.to(device)
    lpips = TorchLPIPS().to(device).eval().requires_grad_(False)
    disc = torch_discriminator().to(device)
    logvar = torch.zeros((), device=device)  # a parameter of the loss that CompVis' optimizers leave out
    opt = torch.optim.Adam(vae.parameters(), lr=4.5e-6, betas=(0.5, 0.9))
    disc_opt = torch.optim.Adam(disc.parameters(), lr=4.5e-6, betas=(0.5, 0.9))
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    last = vae.decoder.conv_out.weight

    def autoencode(x):
        """The reconstruction of a posterior sample, and the posterior's mean and log-variance."""
        posterior = vae.encode(x).latent_dist
        return vae.decode(posterior.sample()).sample, posterior.mean, posterior.logvar

    fns = (autoencode, lpips, disc)
    reconstruct, perceptual, critic = (torch.compile(f) for f in fns) if compile_ else fns

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            rec, mean, var_log = reconstruct(x)
            rec_loss = torch.abs(x - rec.float()) + perceptual(x, rec).float()
            nll = torch.sum(rec_loss / torch.exp(logvar) + logvar) / batch
            kl = 0.5 * torch.sum(mean.float() ** 2 + torch.exp(var_log.float()) - 1.0 - var_log.float()) / batch
            g_loss = -torch.mean(critic(rec).float())
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        d_weight = torch.clamp(torch.norm(g_nll) / (torch.norm(g_gan) + 1e-4), 0.0, 1e4).detach() * disc_weight
        (nll + kl_weight * kl + d_weight * g_loss).backward()
        opt.step()
        disc_opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            with torch.no_grad():
                rec = reconstruct(x)[0]
            real, fake = critic(x).float(), critic(rec).float()
            d_loss = 0.5 * (torch.mean(torch.relu(1.0 - real)) + torch.mean(torch.relu(1.0 + fake)))
        d_loss.backward()
        disc_opt.step()

    seconds = _median_seconds(step, warmup + 2 * compile_, reps)
    _report(name, compile_, batch, sum(p.numel() for p in vae.parameters()), seconds)
