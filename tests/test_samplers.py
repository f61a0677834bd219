"""Schedules, objectives and samplers; trajectories step for step against diffusers' schedulers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from latentdiff.diffusion import objectives, samplers
from latentdiff.diffusion.schedules import NoiseSchedule, make_betas
from tests.torch_utils import rel_err

SHAPE = (2, 8, 8, 4)
LDM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PAPER = dict(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
COMPVIS = dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def toy_model(x, t):
    """Deterministic elementwise 'eps model', written once for torch tensors and jnp arrays."""
    if isinstance(x, torch.Tensor):
        return 0.3 * x + 0.1 * torch.sin(x) * (float(t) / 1000)
    return 0.3 * x + 0.1 * jnp.sin(x) * (t.astype(jnp.float32) / 1000).reshape(-1, 1, 1, 1)


def x_T(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def run_ours(config, x, noise=None, model=toy_model, **kw):
    kw = {**samplers.sampler_kwargs_from_diffusers(config), **kw}
    schedule = NoiseSchedule.from_diffusers(config)
    fn = jax.jit(lambda x, noise: samplers.sample(model, x, schedule, noise=noise, return_trajectory=True, **kw))
    x0, traj = fn(jnp.asarray(x), None if noise is None else jnp.asarray(noise))
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(traj[-1]))
    return np.asarray(traj)


def run_diffusers(scheduler, num_steps, x, step_kwargs=lambda i, t: {}, model=toy_model):
    scheduler.set_timesteps(num_steps)
    x, traj = torch.from_numpy(x), []
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(x, int(t)), t, x, **step_kwargs(i, t)).prev_sample
        traj.append(x.numpy())
    return np.stack(traj)


def assert_trajectories_match(ours, ref, tol=1e-5):
    assert ours.shape == ref.shape
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert max(errs) <= tol, f"max per-step rel err {max(errs):.2e} at step {int(np.argmax(errs))}"


# ---------------------------------------------------------------- schedules and timesteps


def test_linear_schedule_is_paper_formula_and_diffusers_scaled_linear():
    t = np.arange(1000)
    want = (np.sqrt(0.0015) + (np.sqrt(0.0195) - np.sqrt(0.0015)) * t / 999) ** 2
    np.testing.assert_allclose(make_betas("linear"), want, rtol=1e-12)
    np.testing.assert_allclose(make_betas("sqrt_linear"), np.linspace(0.0015, 0.0195, 1000), rtol=1e-12)
    for cfg in (PAPER, dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2")):
        ours = NoiseSchedule.from_diffusers(cfg)
        ref = DDIMScheduler(**cfg)
        np.testing.assert_allclose(ours.betas, ref.betas.double().numpy(), rtol=1e-5)
        np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-4)  # fp32 cumprod


def test_q_sample_jits():
    s = NoiseSchedule.from_config()
    x0, n, t = jnp.ones(SHAPE), jnp.full(SHAPE, 2.0), jnp.array([0, 999])
    got = jax.jit(s.q_sample)(x0, t, n)
    a = s.alphas_cumprod[[0, 999]]
    np.testing.assert_allclose(got[:, 0, 0, 0], np.sqrt(a) + 2 * np.sqrt(1 - a), rtol=1e-6)


def test_compvis_timesteps():
    np.testing.assert_array_equal(samplers.timesteps(1000, 50, "uniform"), (np.arange(0, 1000, 20) + 1)[::-1])
    assert len(samplers.timesteps(1000, 400, "uniform")) == 500
    assert len(samplers.timesteps(1000, 81, "uniform")) == 84
    quad = samplers.timesteps(1000, 10, "quad")
    np.testing.assert_array_equal(quad, ((np.linspace(0, np.sqrt(800), 10) ** 2).astype(int) + 1)[::-1])
    for s in (3, 27, 101, 333):  # CompVis would index alphas_cumprod[1000]
        with pytest.raises(ValueError, match="index-1000"):
            samplers.timesteps(1000, s, "uniform")
    table = samplers.step_table(NoiseSchedule.from_config(), "ddim", 50)
    np.testing.assert_array_equal(table["t"], (np.arange(0, 1000, 20) + 1)[::-1])


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_diffusers_spacings(spacing):
    for s in (10, 50, 333):
        ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
        ref.set_timesteps(s)
        np.testing.assert_array_equal(samplers.timesteps(1000, s, spacing, 1), ref.timesteps.numpy())


# ---------------------------------------------------------------- objectives


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_prediction_type_round_trip(kind):
    rng = np.random.default_rng(1)
    x0, eps = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(2))
    a = jnp.array([0.9, 0.05])
    x_t = jnp.sqrt(a)[:, None, None, None] * x0 + jnp.sqrt(1 - a)[:, None, None, None] * eps
    out = jax.jit(objectives.training_target, static_argnums=3)(x0, eps, a, kind)
    np.testing.assert_allclose(objectives.to_x0(out, x_t, a, kind), x0, atol=2e-5)
    np.testing.assert_allclose(objectives.to_eps(out, x_t, a, kind), eps, atol=2e-5)
    loss = objectives.diffusion_loss(out, out + 1.0)
    np.testing.assert_allclose(loss, [1.0, 1.0])
    assert objectives.diffusion_loss(out, out - 2.0, "l1").shape == (2,)


# ---------------------------------------------------------------- samplers vs diffusers


@pytest.mark.parametrize("betas,num_steps", [(LDM, 50), (PAPER, 20), (LDM, 20)])
def test_ddim_matches_diffusers(betas, num_steps):
    config = dict(_class_name="DDIMScheduler", **betas, **COMPVIS)
    x = x_T()
    assert_trajectories_match(run_ours(config, x, num_steps=num_steps),
                              run_diffusers(DDIMScheduler(**config), num_steps, x))


def test_ddim_v_prediction_matches_diffusers():
    config = dict(_class_name="DDIMScheduler", **LDM, **COMPVIS, prediction_type="v_prediction")
    x = x_T(1)
    assert_trajectories_match(run_ours(config, x, num_steps=20), run_diffusers(DDIMScheduler(**config), 20, x))


def test_ddim_eta_adds_noise_like_diffusers():
    config = dict(_class_name="DDIMScheduler", **LDM, **COMPVIS)
    x, steps, eta = x_T(2), 20, 0.7
    noise = np.random.default_rng(3).standard_normal((steps,) + SHAPE).astype(np.float32)
    ref = run_diffusers(DDIMScheduler(**config), steps, x,
                        lambda i, t: dict(eta=eta, variance_noise=torch.from_numpy(noise[i])))
    ours = run_ours(config, x, noise, num_steps=steps, eta=eta)
    assert_trajectories_match(ours, ref)
    assert rel_err(ours[-1], run_ours(config, x, num_steps=steps)[-1]) > 1e-2  # the noise is really there
    # with an rng instead of pre-drawn noise it runs and differs per key
    schedule = NoiseSchedule.from_diffusers(config)
    f = jax.jit(lambda k: samplers.sample(toy_model, x, schedule, num_steps=steps, eta=eta, rng=k))
    assert not np.allclose(f(jax.random.key(0)), f(jax.random.key(1)))
    # eta as a jit argument (one program for every eta) gives the same samples
    g = jax.jit(lambda eta, noise: samplers.sample(toy_model, x, schedule, num_steps=steps, eta=eta,
                                                   rng=jax.random.key(0), noise=noise))
    assert rel_err(g(eta, noise), ours[-1]) < 1e-5
    assert rel_err(g(0.0, noise), run_ours(config, x, num_steps=steps)[-1]) < 1e-5


def test_plms_matches_diffusers_pndm():
    config = dict(_class_name="PNDMScheduler", **LDM, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    x = x_T(4)
    ours = run_ours(config, x, num_steps=20)
    assert len(ours) == 21  # predictor row + 20 steps, as diffusers' 21 calls
    assert_trajectories_match(ours, run_diffusers(PNDMScheduler(**config), 20, x))


@pytest.mark.parametrize("num_steps,extra", [(20, {}), (10, {}), (20, dict(final_sigmas_type="sigma_min")),
                                             (10, dict(timestep_spacing="leading", steps_offset=1))])
def test_dpm_solver_matches_diffusers(num_steps, extra):
    config = dict(_class_name="DPMSolverMultistepScheduler", **LDM, **extra)
    x = x_T(5)
    assert_trajectories_match(run_ours(config, x, num_steps=num_steps),
                              run_diffusers(DPMSolverMultistepScheduler(**config), num_steps, x))


@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ddpm_matches_diffusers_with_same_noise(num_steps):
    config = dict(_class_name="DDPMScheduler", **PAPER, clip_sample=False)
    ref_sched = DDPMScheduler(**config)
    ref_sched.set_timesteps(num_steps)
    # diffusers' float32 cumprod makes 1 - alpha_bar near t = 0 wrong by ~4e-5 relative, which grows
    # to 1.2e-5 over 1000 steps; its own betas with a float64 cumprod (sample math stays float32)
    # give the reference we test against (stock diffusers vs this: 1.2e-5; ours vs this: 2.9e-6).
    ref_sched.alphas_cumprod = torch.cumprod(1 - ref_sched.betas.double(), 0)
    ref_sched.one = torch.tensor(1.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)  # diffusers draws one randn per step with t > 0
    noise = np.stack([torch.randn(SHAPE, generator=gen).numpy() if t > 0 else np.zeros(SHAPE, np.float32)
                      for t in ref_sched.timesteps])
    x = x_T(6)
    gen.manual_seed(0)
    ref = run_diffusers(ref_sched, num_steps, x, lambda i, t: dict(generator=gen))
    assert_trajectories_match(run_ours(config, x, noise, num_steps=num_steps), ref)


# ---------------------------------------------------------------- API details


def test_sampler_kwargs_from_diffusers_defaults_and_warnings():
    kw = samplers.sampler_kwargs_from_diffusers(dict(_class_name="DDIMScheduler", **LDM, **COMPVIS))
    assert kw == dict(sampler="ddim", prediction_type="eps", spacing="leading", steps_offset=1,
                      set_alpha_to_one=False)
    with pytest.warns(UserWarning, match="clip_sample"):
        kw = samplers.sampler_kwargs_from_diffusers({"_class_name": "DDIMScheduler"})
    assert kw["set_alpha_to_one"] and kw["steps_offset"] == 0
    dpm = {"_class_name": "DPMSolverMultistepScheduler"}
    assert samplers.sampler_kwargs_from_diffusers(dpm)["spacing"] == "linspace"
    assert samplers.sampler_kwargs_from_diffusers(dpm)["sampler"] == "dpm_solver++"


def test_inpaint_and_errors():
    schedule = NoiseSchedule.from_config()
    x = jnp.asarray(x_T(7))
    known = jnp.full(SHAPE, 0.5)
    run = jax.jit(lambda keep: samplers.sample(toy_model, x, schedule, sampler="plms", num_steps=10,
                                               rng=jax.random.key(0), inpaint=(known, keep)))
    plain = samplers.sample(toy_model, x, schedule, sampler="plms", num_steps=10)
    np.testing.assert_allclose(run(jnp.zeros(SHAPE)), plain, rtol=1e-6, atol=1e-6)
    assert not np.allclose(run(jnp.ones(SHAPE)), plain)
    with pytest.raises(ValueError, match="needs rng"):
        samplers.sample(toy_model, x, schedule, sampler="ddpm", num_steps=10)
    with pytest.raises(ValueError, match="eta"):
        samplers.sample(toy_model, x, schedule, sampler="plms", eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.sample(toy_model, x, schedule, sampler="euler")


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_per_step_rows_meet_their_steps(sampler):
    """A model_fn's `per_step` runs once on every row's timestep, and each call gets its own row
    (PLMS' predictor row too): the toy model's time factor, computed apart, gives the same samples."""
    schedule = NoiseSchedule.from_config()
    x = jnp.asarray(x_T(3))
    seen = []

    def model(x, t, step):
        return 0.3 * x + 0.1 * jnp.sin(x) * step["factor"].reshape(-1, 1, 1, 1)

    def per_step(ts):
        seen.append(ts.shape)
        return {"factor": (ts.astype(jnp.float32) / 1000)[:, None]}

    model.per_step = per_step
    run = lambda fn: jax.jit(lambda x: samplers.sample(fn, x, schedule, sampler=sampler, num_steps=10))(x)  # noqa: E731
    np.testing.assert_allclose(run(model), run(toy_model), rtol=1e-6, atol=1e-6)
    assert seen == [(10 + (sampler == "plms"),)]
