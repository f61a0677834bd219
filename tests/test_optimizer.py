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
