"""Noise schedules (CompVis `make_beta_schedule`, float64) and the forward process q(x_t | x_0).

Names follow the paper's code: 'linear' is linear in sqrt(beta) (= diffusers 'scaled_linear'),
'sqrt_linear' is a plain linspace (= diffusers 'linear'). `NoiseSchedule.from_diffusers` reads a
diffusers scheduler config, whose names mean diffusers' schedules.
"""
import dataclasses
import math

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "sqrt_linear", "cosine", "sqrt")


def make_betas(schedule="linear", num_timesteps=1000, beta_start=0.0015, beta_end=0.0195, cosine_s=8e-3):
    """Betas (float64, shape (num_timesteps,)) of one of the paper's schedules (see `SCHEDULES`)."""
    t = num_timesteps
    if schedule in ("linear", "scaled_linear"):
        return np.linspace(beta_start**0.5, beta_end**0.5, t, dtype=np.float64) ** 2
    if schedule == "sqrt_linear":
        return np.linspace(beta_start, beta_end, t, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(beta_start, beta_end, t, dtype=np.float64) ** 0.5
    if schedule == "cosine":
        f = np.cos((np.arange(t + 1, dtype=np.float64) / t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return np.clip(1 - f[1:] / f[:-1], 0.0, 0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {SCHEDULES}")


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: usable as a static jit argument
class NoiseSchedule:
    """A discrete schedule: `betas` and `alphas_cumprod` (float64 numpy, index t = 0..T-1)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        betas = np.asarray(self.betas, np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array with values in (0, 1)")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", np.cumprod(1.0 - betas))

    @property
    def num_timesteps(self):
        return len(self.betas)

    @classmethod
    def from_config(cls, schedule="linear", num_timesteps=1000, beta_start=0.0015, beta_end=0.0195, **kw):
        """The paper's schedule by name (its YAML `linear_start`/`linear_end` are beta_start/end)."""
        return cls(make_betas(schedule, num_timesteps, beta_start, beta_end, **kw))

    @classmethod
    def from_diffusers(cls, scheduler_config):
        """From a diffusers scheduler config dict; `beta_schedule` uses diffusers' names."""
        c = dict(scheduler_config)
        if c.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr=True is not supported")
        if c.get("trained_betas") is not None:
            return cls(np.asarray(c["trained_betas"], np.float64))
        name = c.get("beta_schedule", "linear")
        ours = {"linear": "sqrt_linear", "scaled_linear": "linear", "squaredcos_cap_v2": "cosine"}
        if name not in ours:
            raise ValueError(f"unsupported diffusers beta_schedule {name!r}; expected one of {list(ours)}")
        return cls.from_config(ours[name], c.get("num_train_timesteps", 1000),
                               c.get("beta_start", 0.0001), c.get("beta_end", 0.02))

    def alpha_bar(self, t):
        """alphas_cumprod[t] as float32 (t an int array, traced or not)."""
        return jnp.asarray(self.alphas_cumprod, jnp.float32)[t]

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t: int (B,) array, x0: (B, ...)."""
        a = self.alpha_bar(t).reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
        return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
