"""Samplers: DDIM, PLMS, ancestral DDPM and DPM-Solver++(2M), each one `lax.scan` under `jax.jit`.

Every sampler is the same linear update, applied once per row of a step table computed in float64
numpy at trace time:

    d      = eps or x0 implied by model_fn(x, t)          (x0 for 'dpm_solver++', eps otherwise)
    x_next = c_x * base + c_d[0] * d + sum_k c_d[k] * hist[k-1] + sigma * z

with `hist` the last d's (pushed where `push`), `base` = x or, where `from_saved`, the previous row's
input (PLMS' pseudo improved Euler step, which costs one extra row). The scan body has no branches.

Defaults follow the paper's code for 'ddim'/'plms' (CompVis 'uniform' timesteps with the +1 offset,
final alpha_bar = alpha_bar[0]) and diffusers for 'ddpm' ('leading', final alpha_bar 1) and
'dpm_solver++' ('linspace', final sigma 0). `sampler_kwargs_from_diffusers` maps a diffusers
scheduler config onto these settings.

Known deviation: for 'linspace'/'trailing' spacings diffusers' DDIM/PNDM step from t to t - T//S
rather than to the next listed timestep; we always step to the next listed timestep (as CompVis).
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from latentdiff.diffusion.objectives import canonical_prediction_type, to_eps, to_x0

SAMPLERS = ("ddim", "plms", "ddpm", "dpm_solver++")
SPACINGS = ("uniform", "quad", "leading", "linspace", "trailing")
# sampler -> (spacing, steps_offset, set_alpha_to_one)
DEFAULTS = {
    "ddim": ("uniform", 1, False),
    "plms": ("uniform", 1, False),
    "ddpm": ("leading", 0, True),
    "dpm_solver++": ("linspace", 0, True),
}
_AB = [[1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]


def timesteps(num_train, num_steps, spacing="leading", steps_offset=1):
    """Descending int64 model timesteps.

    'uniform' (CompVis `make_ddim_timesteps`): arange(0, T, T//S) + offset; it has ceil(T/(T//S))
    entries, e.g. S=400 gives 500. 'quad' (CompVis): int(linspace(0, sqrt(0.8T), S)^2) + offset.
    'leading', 'linspace', 'trailing': diffusers' spacings (offset used by 'leading' only).
    A timestep >= T (CompVis' index-1000 bug, e.g. 'uniform' with S=3 or 101..111) raises ValueError.
    """
    t, s = num_train, num_steps
    if not 1 <= s <= t:
        raise ValueError(f"num_steps must be in [1, {t}], got {s}")
    if spacing == "uniform":
        ts = np.arange(0, t, t // s) + steps_offset
    elif spacing == "quad":
        ts = (np.linspace(0, np.sqrt(0.8 * t), s) ** 2).astype(np.int64) + steps_offset
    elif spacing == "leading":
        ts = np.arange(s) * (t // s) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, t - 1, s).round()
    elif spacing == "trailing":
        ts = np.round(np.arange(t, 0, -t / s)) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    ts = np.sort(ts.astype(np.int64))[::-1]
    if ts[0] >= t or ts[-1] < 0:
        raise ValueError(
            f"spacing={spacing!r}, num_steps={s}, steps_offset={steps_offset} gives timestep {ts[0]}, "
            f"outside [0, {t - 1}] (the CompVis index-{t} bug); pick another num_steps or spacing "
            "('leading' or 'linspace')")
    return ts


def _sampler_timesteps(sampler, num_train, num_steps, spacing, steps_offset):
    if sampler == "dpm_solver++" and spacing in ("linspace", "leading"):
        # diffusers' DPMSolverMultistepScheduler lays out S+1 points and drops the last one.
        return timesteps(num_train, num_steps + 1, spacing, steps_offset)[:-1]
    return timesteps(num_train, num_steps, spacing, steps_offset)


def _concrete(x):
    """float(x), or None where x is traced (e.g. eta passed as a jit argument)."""
    try:
        return float(x)
    except jax.errors.ConcretizationTypeError:
        return None


def _ddim_coefs(a, a_next, eta):
    """x_next = c_x x + c_e eps + sigma z (DDIM paper eq. 12/16, x0 not clipped).

    A traced eta gives jnp c_e and sigma (float32 from float64 pieces; the direction is clamped at 0).
    """
    sigma1 = np.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))  # sigma at eta = 1
    q = np.sqrt(a_next * (1 - a) / a)
    if _concrete(eta) is None:
        sigma = eta * jnp.asarray(sigma1, jnp.float32)
        c_e = jnp.sqrt(jnp.maximum(jnp.asarray(1 - a_next, jnp.float32) - sigma**2, 0)) - jnp.asarray(q, jnp.float32)
        return np.sqrt(a_next / a), c_e, sigma
    sigma = float(eta) * sigma1
    direction = 1 - a_next - sigma**2
    if np.any(direction < -1e-12):
        raise ValueError(f"eta={eta} is too large: 1 - alpha_bar_prev - sigma^2 < 0")
    return np.sqrt(a_next / a), np.sqrt(np.maximum(direction, 0)) - q, sigma


def _ddim_rows(ts, a, a_next, eta):
    c_x, c_e, sigma = _ddim_coefs(a, a_next, eta)
    return dict(t=ts, alpha_bar=a, c_x=c_x, c_d=c_e[:, None], sigma=sigma)


def _plms_rows(ts, a, a_next):
    """Row 0: Euler predictor; row 1: corrector (mean of both eps) from the saved x; then AB2..AB4."""
    c_x, c_e, _ = _ddim_coefs(a, a_next, 0.0)
    n = len(ts)
    rows = [(ts[0], a[0], c_x[0], [c_e[0]], True, False)]
    if n > 1:
        rows.append((ts[1], a[1], c_x[0], [c_e[0] / 2, c_e[0] / 2], False, True))
    for i in range(1, n):
        rows.append((ts[i], a[i], c_x[i], [c_e[i] * w for w in _AB[min(i, 3)]], True, False))
    t, ab, cx, cd, push, saved = zip(*rows)
    c_d = np.zeros((len(rows), 4))
    for r, ws in enumerate(cd):
        c_d[r, : len(ws)] = ws
    return dict(t=np.array(t), alpha_bar=np.array(ab), c_x=np.array(cx), c_d=c_d,
                sigma=np.zeros(len(rows)), push=np.array(push), from_saved=np.array(saved))


def _ddpm_rows(ts, a, a_next):
    """Posterior mean and fixed_small std of q(x_prev | x_t, x0), strided; no noise at the end."""
    beta = 1 - a / a_next
    c0 = np.sqrt(a_next) * beta / (1 - a)  # on x0
    c1 = np.sqrt(a / a_next) * (1 - a_next) / (1 - a)  # on x_t
    sigma = np.sqrt(np.maximum((1 - a_next) / (1 - a) * beta, 1e-20))
    sigma[-1] = 0.0
    c_e = -c0 * np.sqrt((1 - a) / a)
    return dict(t=ts, alpha_bar=a, c_x=c1 + c0 / np.sqrt(a), c_d=c_e[:, None], sigma=sigma)


def _dpm_rows(ts, a, a_next):
    """DPM-Solver++(2M, midpoint) in x0 form; first order at the first and the final step."""
    n = len(ts)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_ratio = np.sqrt((1 - a_next) / (1 - a))  # sigma_t / sigma_s
        phi = 1 - np.sqrt((1 - a_next) / a_next) / np.sqrt((1 - a) / a)  # 1 - exp(-h)
        c1 = np.sqrt(a_next) * phi
        lam = 0.5 * np.log(np.concatenate([a, a_next[-1:]]) / (1 - np.concatenate([a, a_next[-1:]])))
        h = lam[1:] - lam[:-1]
        r = np.concatenate([[np.nan], h[:-1]]) / h
        second = np.arange(n) > 0
        second[-1] &= not (a_next[-1] == 1.0 or n < 15)  # diffusers' lower_order_final
        c_d = np.where(second[:, None],
                       np.stack([c1 * (1 + 0.5 / r), -c1 * 0.5 / r], 1),
                       np.stack([c1, np.zeros(n)], 1))
    return dict(t=ts, alpha_bar=a, c_x=s_ratio, c_d=c_d, sigma=np.zeros(n))


def step_table(schedule, sampler="ddim", num_steps=50, eta=0.0, spacing=None, steps_offset=None,
               set_alpha_to_one=None):
    """The per-row table (numpy) that `sample` scans over: t, alpha_bar, c_x, c_d, sigma, push,
    from_saved. None for spacing/steps_offset/set_alpha_to_one means the sampler's `DEFAULTS`.
    eta may be traced (a jit argument): then 'ddim' rows c_d and sigma are jnp arrays, and other
    samplers ignore it (a traced eta cannot be checked)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    eta_value = _concrete(eta)
    if eta_value is not None and (eta_value < 0 or (eta_value != 0 and sampler != "ddim")):
        raise ValueError(f"eta={eta}: eta >= 0 applies to 'ddim' only, got sampler {sampler!r}")
    d_spacing, d_offset, d_one = DEFAULTS[sampler]
    spacing = d_spacing if spacing is None else spacing
    steps_offset = d_offset if steps_offset is None else steps_offset
    set_alpha_to_one = d_one if set_alpha_to_one is None else set_alpha_to_one
    abar = schedule.alphas_cumprod
    ts = _sampler_timesteps(sampler, len(abar), num_steps, spacing, steps_offset)
    a = abar[ts]
    a_next = np.append(a[1:], 1.0 if set_alpha_to_one else abar[0])
    if sampler == "ddim":
        rows = _ddim_rows(ts, a, a_next, eta)
    elif sampler == "plms":
        rows = _plms_rows(ts, a, a_next)
    elif sampler == "ddpm":
        rows = _ddpm_rows(ts, a, a_next)
    else:
        rows = _dpm_rows(ts, a, a_next)
    n = len(rows["t"])
    rows.setdefault("push", np.ones(n, bool))
    rows.setdefault("from_saved", np.zeros(n, bool))
    rows["t"] = rows["t"].astype(np.int32)
    return rows


def sample(model_fn, x_T, schedule, *, sampler="ddim", num_steps=50, eta=0.0, rng=None,
           prediction_type="eps", spacing=None, steps_offset=None, set_alpha_to_one=None,
           inpaint=None, noise=None, return_trajectory=False):
    """Run a sampler from x_T; returns x_0 (float32), or (x_0, per-row x's) with return_trajectory.

    model_fn(x, t) -> model output (t: int32 (B,)); guidance belongs inside model_fn. A model_fn with
      a `per_step` attribute, per_step(ts) -> a pytree whose leaves have a leading axis of len(ts),
      has it called once, before the loop, on the timesteps of all rows (ts: int32 (rows,)), and is
      called as model_fn(x, t, step) with its row of that pytree: what a step computes from its
      timestep alone (`pipeline.guided_model_fn`: the UNet's time projections) leaves the loop.
    rng: a JAX key, needed for eta > 0 (or a traced eta), 'ddpm' and `inpaint`; row i uses
      fold_in(rng, i). eta may be a traced value, so that one compiled program serves every eta.
    noise: optional pre-drawn step noise, shape (rows, *x_T.shape), used instead of rng for the
      sigma * z term (rows = num timesteps; PLMS has one more row, its predictor).
    inpaint: (x0_known, keep_mask): before each step x = q_sample(x0_known, t) * keep + (1 - keep) * x
      (CompVis masked sampling; its q_sample noise comes from rng).
    The trajectory's rows are the scan's outputs: one per step (PLMS: predictor, then one per step).
    """
    table = step_table(schedule, sampler, num_steps, eta, spacing, steps_offset, set_alpha_to_one)
    kind = canonical_prediction_type(prediction_type)
    convert = to_x0 if sampler == "dpm_solver++" else to_eps
    n_rows, k = table["c_d"].shape
    sigma = table["sigma"]
    use_noise = not isinstance(sigma, np.ndarray) or bool(sigma.any())  # traced eta: always
    use_saved = bool(table["from_saved"].any())
    if (use_noise and noise is None or inpaint is not None) and rng is None:
        raise ValueError(f"sampler={sampler!r} (eta={eta}, inpaint={inpaint is not None}) needs rng")
    x = jnp.asarray(x_T, jnp.float32)
    xs = {name: jnp.asarray(v, jnp.float32 if jnp.issubdtype(v.dtype, jnp.floating) else v.dtype)
          for name, v in table.items()}
    xs["i"] = jnp.arange(n_rows, dtype=jnp.int32)
    per_step = getattr(model_fn, "per_step", None)
    if per_step is not None:
        xs["model"] = per_step(xs["t"])
    if use_noise and noise is not None:
        if noise.shape != (n_rows,) + x.shape:
            raise ValueError(f"noise must have shape {(n_rows,) + x.shape}, got {noise.shape}")
        xs["z"] = jnp.asarray(noise, jnp.float32)

    def body(carry, row):
        x, x_saved, hist = carry
        key = None if rng is None else jax.random.fold_in(rng, row["i"])
        x_in = x
        if inpaint is not None:
            x0_known, keep = inpaint
            z = jax.random.normal(jax.random.fold_in(key, 1), x.shape, jnp.float32)
            a = row["alpha_bar"]
            known = jnp.sqrt(a) * x0_known + jnp.sqrt(1 - a) * z
            x_in = jnp.where(row["from_saved"], x, known * keep + (1 - keep) * x)
        t = jnp.full((x.shape[0],), row["t"], jnp.int32)
        out = model_fn(x_in, t) if per_step is None else model_fn(x_in, t, row["model"])
        d = convert(out.astype(jnp.float32), x_in, row["alpha_bar"], kind)
        base = jnp.where(row["from_saved"], x_saved, x_in) if use_saved else x_in
        x_next = row["c_x"] * base + row["c_d"][0] * d
        for j in range(1, k):
            x_next = x_next + row["c_d"][j] * hist[j - 1]
        if use_noise:
            z = row["z"] if "z" in row else jax.random.normal(jax.random.fold_in(key, 0), x.shape, jnp.float32)
            x_next = x_next + row["sigma"] * z
        if k > 1:
            hist = jnp.where(row["push"], jnp.concatenate([d[None], hist])[: k - 1], hist)
        return (x_next, x_in, hist), (x_next if return_trajectory else None)

    init = (x, x, jnp.zeros((k - 1,) + x.shape, jnp.float32))
    (x0, _, _), traj = jax.lax.scan(body, init, xs)
    return (x0, traj) if return_trajectory else x0


_DIFFUSERS_SAMPLERS = {"DDIMScheduler": "ddim", "PNDMScheduler": "plms", "DDPMScheduler": "ddpm",
                       "DPMSolverMultistepScheduler": "dpm_solver++"}


def sampler_kwargs_from_diffusers(scheduler_config):
    """`sample` keywords {sampler, prediction_type, spacing, steps_offset, set_alpha_to_one} that
    reproduce a diffusers scheduler config (absent keys take diffusers' defaults). Settings we do not
    reproduce (clipping, thresholding, PRK warm-up, other solvers) are warned about and ignored."""
    c = dict(scheduler_config)
    name = c.get("_class_name", "DDIMScheduler")
    sampler = _diffusers_sampler(c)
    ignored = []
    if name in ("DDIMScheduler", "DDPMScheduler") and c.get("clip_sample", True):
        ignored.append("clip_sample=True")
    if c.get("thresholding"):
        ignored.append("thresholding=True")
    if name == "PNDMScheduler" and not c.get("skip_prk_steps", False):
        ignored.append("skip_prk_steps=False (PRK warm-up; PLMS with a pseudo Euler start is used)")
    if name == "DDPMScheduler" and c.get("variance_type", "fixed_small") != "fixed_small":
        ignored.append(f"variance_type={c['variance_type']!r} (fixed_small is used)")
    if name == "DPMSolverMultistepScheduler":
        want = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                    euler_at_final=False, use_karras_sigmas=False, use_lu_lambdas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False)
        ignored += [f"{key}={c[key]!r}" for key, v in want.items() if key in c and c[key] != v]
    if ignored:
        warnings.warn(f"{name} settings not reproduced and ignored: {', '.join(ignored)}", stacklevel=2)
    if sampler == "dpm_solver++":
        set_one = c.get("final_sigmas_type", "zero") == "zero"
    elif sampler == "ddpm":
        set_one = True
    else:
        set_one = bool(c.get("set_alpha_to_one", True))
    return dict(sampler=sampler,
                prediction_type=canonical_prediction_type(c.get("prediction_type", "epsilon")),
                spacing=c.get("timestep_spacing", "linspace" if sampler == "dpm_solver++" else "leading"),
                steps_offset=int(c.get("steps_offset", 0)), set_alpha_to_one=set_one)


def _diffusers_sampler(c):
    name = c.get("_class_name", "DDIMScheduler")
    if name not in _DIFFUSERS_SAMPLERS:
        raise ValueError(f"unsupported scheduler {name!r}; expected one of {list(_DIFFUSERS_SAMPLERS)}")
    return _DIFFUSERS_SAMPLERS[name]
