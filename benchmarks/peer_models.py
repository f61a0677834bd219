"""diffusers equivalents of the other models that `bench.py` trains, timed the way the reference peer
(`../shared/bench/peer_torch.py`) times the txt2img UNet: bf16 autocast, AdamW, eager and
`torch.compile`, each step waited for (`torch.cuda.synchronize`), median after warm-up.

cin256-v2 (`configs/cin256_v2.py`): a `UNet2DConditionModel` with one attention head per site, cross-
attention over the class embedding (a context of one 512-wide token, which `ClassEmbedder` gives) on
64x64x3 latents; 400.9M parameters, the same architecture as ours (`UNetConfig.from_diffusers` of it
equals the config's UNet, a test checks).
"""
import json
import time

# smoke: the same structure shrunk for a CPU
CIN256_V2 = dict(in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960),
                 down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                 up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
                 layers_per_block=2, attention_head_dim=1, cross_attention_dim=512)
CIN256_V2_SMOKE = dict(CIN256_V2, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                       cross_attention_dim=32, norm_num_groups=8)
MODELS = {"cin256": (CIN256_V2, 64, (1, 512)), "cin256_smoke": (CIN256_V2_SMOKE, 8, (1, 32))}


def build(name, device=None):
    """The diffusers UNet of `MODELS[name]`, its latent size and its context's (tokens, width)."""
    import diffusers

    kwargs, size, context = MODELS[name]
    model = diffusers.UNet2DConditionModel(sample_size=size, **kwargs)
    return (model if device is None else model.to(device)), size, context


def _median_seconds(fn, warmup, reps):
    import torch

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


def bench_train(name, batch, compile_, warmup=3, reps=10):
    """One JSON line: the train step (eps loss, AdamW) of `name`'s UNet at `batch`, as the reference
    peer measures its own."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model, size, (tokens, width) = build(name, device)
    params = sum(p.numel() for p in model.parameters())
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
    print(json.dumps(dict(what=f"train_step_{name}", compile=compile_, batch=batch, params_M=round(params / 1e6, 1),
                          step_s=round(seconds, 4), img_per_s=round(batch / seconds, 1))), flush=True)
