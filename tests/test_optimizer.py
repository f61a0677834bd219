"""The training optimizer: AdamW with the small weights updated as one packed vector."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from latentdiff.training.state import make_optimizer, packed_small


def _tree():
    k = iter(jax.random.split(jax.random.key(0), 8))
    return {"conv": {"kernel": jax.random.normal(next(k), (8, 3, 3, 40)), "bias": jax.random.normal(next(k), (8,))},
            "norm": {"scale": jax.random.normal(next(k), (40,)), "bias": jax.random.normal(next(k), (40,))},
            "half": jax.random.normal(next(k), (5,)).astype(jnp.bfloat16)}


def test_packed_small_updates_as_the_inner_optimizer_over_steps():
    params = _tree()
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
    packed = packed_small(inner, max_size=1000)
    # the biases and the norm are packed (8 + 40 + 40 values); the kernel (2,880) and bf16 are not
    vec, big = packed.init(params)[1][0].mu
    assert vec.shape == (88,) and sorted(x.size for x in big) == [5, 2880]
    s_inner, s_packed, p_inner, p_packed = inner.init(params), packed.init(params), params, params
    for i in range(3):
        grads = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.key(10 + i), x.shape).astype(x.dtype),
                                       params)
        u_inner, s_inner = inner.update(grads, s_inner, p_inner)
        u_packed, s_packed = jax.jit(packed.update)(grads, s_packed, p_packed)
        assert jax.tree_util.tree_structure(u_packed) == jax.tree_util.tree_structure(u_inner)
        for a, b in zip(jax.tree_util.tree_leaves(u_packed), jax.tree_util.tree_leaves(u_inner)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-8)
        p_inner, p_packed = optax.apply_updates(p_inner, u_inner), optax.apply_updates(p_packed, u_packed)


def test_make_optimizer_packs_the_small_weights():
    optim = ml_collections.ConfigDict(dict(lr=1e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                                           schedule="constant", grad_clip=0.0))
    state = make_optimizer(optim, 10).init({"w": jnp.ones((300, 300)), "b": jnp.ones((300,)), "g": jnp.ones((300,))})
    vec, big = state[0].mu
    assert vec.shape == (600,) and [x.shape for x in big] == [(300, 300)]


def _optim():
    return ml_collections.ConfigDict(dict(lr=1e-2, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                                          schedule="constant", grad_clip=1.0))


def test_checkpoints_from_before_the_packing_resume_repacked(tmp_path, capsys):
    """A train state saved with the optimizer layout from before `packed_small` (moments shaped
    like the weights) resumes through `loop.resume`'s fallback: repacked, it continues exactly as
    a packed run from the same start; without the fallback the restore fails, saying why."""
    import pytest

    from latentdiff import parallel
    from latentdiff.checkpoint import Checkpointer
    from latentdiff.training import loop
    from latentdiff.training.state import TrainState

    params = _tree()
    config = ml_collections.ConfigDict(dict(optim=_optim(), train=dict(steps=10), mesh=dict(fsdp_min_size=2 ** 16)))
    old_tx, new_tx = make_optimizer(config.optim, 10, pack=False), make_optimizer(config.optim, 10)
    grads = [jax.tree_util.tree_map(lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape).astype(x.dtype),
                                    params) for i in range(3)]

    def run(tx, state, p, gs):
        for g in gs:
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
        return state, p

    old_state, old_params = run(old_tx, old_tx.init(params), params, grads[:2])
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(2, TrainState(step=jnp.asarray(2), params=old_params, ema={}, opt_state=old_state,
                            scale_factor=jnp.asarray(1.0)), {"epoch": 0})
    ckpt.wait()

    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, ema={},
                                                   opt_state=new_tx.init(p), scale_factor=jnp.zeros(())), params)
    shardings = parallel.tree_shardings(abstract, mesh)

    class Loader:
        def set_state(self, s):
            self.state = s

    with pytest.raises(RuntimeError, match="could be restored"):
        loop.resume(ckpt, abstract, shardings, Loader(), str(tmp_path))
    loader = Loader()
    state = loop.resume(ckpt, abstract, shardings, loader, str(tmp_path),
                        legacy=loop.unpacked_layout(abstract, config, mesh))
    assert loader.state == {"epoch": 0} and int(state.step) == 2
    assert "has an older layout: converted" in capsys.readouterr().out
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(abstract.opt_state)
    # one more step from the repacked state = the packed optimizer's third step from the same start
    want_state, want_params = run(new_tx, new_tx.init(params), params, grads)
    got_state, got_params = run(new_tx, state.opt_state, state.params, grads[2:])
    for a, b in zip(jax.tree_util.tree_leaves((got_state, got_params)), jax.tree_util.tree_leaves((want_state, want_params))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-7)
