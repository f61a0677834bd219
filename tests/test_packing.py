"""Parameters stacked by shape (`training.packing`): the same step as one array per parameter, in
far fewer arrays, sharded as their members."""
import os
import subprocess
import sys

import jax
import numpy as np

from latentdiff.training import packing
from latentdiff.training.state import TrainState
from tests.test_ldm_step import _leaves, _setup


def test_pack_then_unpack_gives_back_every_parameter():
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    tree = {"a": {"kernel": normal(3, 4), "bias": normal(4)},
            "b": {"kernel": normal(3, 4), "bias": normal(4), "scale": normal(5)},
            "steps": np.arange(4, dtype=np.int32)}
    packed = packing.pack(tree)
    # (3, 4), (4,), (5,) float32 and (4,) int32: members of the same shape and dtype share a stack
    assert sorted(s.shape for s in packed.stacks) == [(1, 4), (1, 5), (2, 3, 4), (2, 4)]
    back = packed.unpack()
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), back, tree)
    assert np.asarray(back["steps"]).dtype == np.int32
    # a Packed is a pytree: leafwise maps keep its layout; its keys name the stacks by shape
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, packed)
    np.testing.assert_array_equal(np.asarray(doubled.unpack()["b"]["scale"]), 2 * tree["b"]["scale"])
    keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(packed)[0]]
    assert "['3x4_float32']" in keys


def test_packed_train_step_equals_the_step_on_one_array_per_parameter():
    state, step, batch = _setup()
    assert isinstance(state.params["unet"], packing.Packed)
    plain = jax.tree_util.tree_map(packing.unpack, state, is_leaf=lambda x: isinstance(x, packing.Packed))
    assert len(jax.tree_util.tree_leaves(state)) * 3 < len(jax.tree_util.tree_leaves(plain))
    new, metrics = step(state, batch)
    ref, ref_metrics = step(plain, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=1e-5)
    for part in ("params", "ema", "opt_state"):
        got = jax.tree_util.tree_map(packing.unpack, getattr(new, part),
                                     is_leaf=lambda x: isinstance(x, packing.Packed))
        for a, b in zip(_leaves(got), _leaves(getattr(ref, part)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


SHARDING_CHECK = """
import jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from latentdiff import parallel
from latentdiff.training import packing
n = jax.device_count()
assert n == 4, n
mesh = parallel.make_mesh(data=1, fsdp=n)
tree = {"kernel": jnp.zeros((3, 3, 8 * n, 16 * n)), "other": jnp.zeros((3, 3, 8 * n, 16 * n)),
        "bias": jnp.zeros((16 * n,))}
packed = packing.pack(tree)
shardings = parallel.tree_shardings({"p": packed, "step": jnp.zeros(())}, mesh, min_size=16)
by_shape = {s.shape: sh.spec for s, sh in zip(packed.stacks, shardings["p"].stacks)}
member = parallel.fsdp_spec((3, 3, 8 * n, 16 * n), n, 16)
assert "fsdp" in member, member
assert by_shape[(2, 3, 3, 8 * n, 16 * n)] == P(None, *member), by_shape
assert by_shape[(1, 16 * n)] == P(None, "fsdp"), by_shape
assert shardings["step"].spec == P()
placed = jax.device_put(packed, shardings["p"])
shards = {s.shape: s.addressable_shards[0].data.shape for s in placed.stacks}
assert shards == {(2, 3, 3, 8 * n, 16 * n): (2, 3, 3, 8 * n, 4 * n), (1, 16 * n): (1, 16)}, shards
print("ok")
"""


def test_stacks_are_sharded_as_their_members_never_along_the_stacking_axis():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    out = subprocess.run([sys.executable, "-c", SHARDING_CHECK], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_train_state_of_stacks_saves_and_restores(tmp_path):
    from latentdiff.checkpoint import Checkpointer

    state, _, _ = _setup()
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(0, state, {"position": 1})
    ckpt.wait()
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored, data, step = ckpt.restore(abstract)
    ckpt.close()
    assert isinstance(restored, TrainState) and isinstance(restored.params["unet"], packing.Packed)
    for a, b in zip(_leaves(restored), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert data == {"position": 1} and step == 0
