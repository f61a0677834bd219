"""The LDM train step itself (tiny class-conditional model, CPU): one update, and the finite guard."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latentdiff import parallel
from latentdiff.convert import loaders
from latentdiff.training import ldm_step
from latentdiff.training.loop import _init_fns, abstract_train_state, compvis_params, init_train_state


def _setup():
    cfg = importlib.import_module("configs.tiny_ldm").get_config()
    spec = loaders.build_ldm(compvis_params(cfg.model), jnp.float32)
    task = ldm_step.LDMTask(unet=spec["unet"], vae=spec["vae"], cond_model=spec["cond_model"], task="class2img",
                            alphas_cumprod=spec["schedule"].alphas_cumprod)
    tx = optax.adamw(1e-3)
    init_params, make_state = _init_fns(spec, task, tx, cfg)
    shardings = parallel.tree_shardings(abstract_train_state(init_params, make_state, jax.random.key(0)),
                                        parallel.make_mesh())
    state = init_train_state(init_params, make_state, jax.random.key(0), shardings)
    step = jax.jit(lambda s, b: ldm_step.train_step(task, tx, 1, s, {"vae": None}, b, jax.random.key(1)))
    moments = jax.random.normal(jax.random.key(2), (4, 4, 4, 6))
    return state, step, {"moments": moments, "class_label": jnp.array([0, 1, 2, 0])}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_a_finite_step_updates_params_ema_and_optimizer():
    state, step, batch = _setup()
    new, metrics = step(state, batch)
    assert bool(metrics["finite"]) and int(new.step) == 1
    changed = [not np.array_equal(a, b) for a, b in zip(_leaves(new.params), _leaves(state.params))]
    assert sum(changed) > len(changed) // 2
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(new.opt_state), _leaves(state.opt_state)))
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(new.ema), _leaves(state.ema)))


def test_a_non_finite_step_changes_nothing_but_the_step():
    state, step, batch = _setup()
    batch["moments"] = batch["moments"].at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = step(state, batch)
    assert not bool(metrics["finite"]) and int(new.step) == 1
    for part in ("params", "ema", "opt_state"):
        for a, b in zip(_leaves(getattr(new, part)), _leaves(getattr(state, part))):
            np.testing.assert_array_equal(a, b)


def test_compile_together_leaves_the_jitted_step_compiled(caplog):
    """The training loops compile the step with `parallel.compile_together` (every process waits for
    the others) and then call the jitted step itself: that call reuses the executable, no second compile."""
    step = jax.jit(lambda s, x: (jax.tree_util.tree_map(lambda a: a * x, s), x.sum()), donate_argnums=(0,))
    state, x = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}, jnp.full((4,), 2.0)
    parallel.compile_together(step, state, x)
    with jax.log_compiles(), caplog.at_level("WARNING"):
        state, total = step(state, x)
        state, total = step(state, x)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()], caplog.text
    np.testing.assert_allclose(np.asarray(state["w"]), 4.0)
    other = jnp.full((1,), 2.0)
    with jax.log_compiles(), caplog.at_level("WARNING"):
        step(state, other)  # a new shape: the check above can see a compile
    assert [r for r in caplog.records if "Compiling" in r.getMessage()]
