"""Mesh, shardings and host-to-device batches: the same code on 1 CPU, fake CPU devices, GPUs, pods.

Mesh axes are ('data', 'fsdp'). The batch is split over both; parameters, EMA and optimizer state
are sharded over 'fsdp' along their largest dimension that divides (FSDP / ZeRO-3 through GSPMD),
small ones replicated.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data=-1, fsdp=1, devices=None):
    """A ('data', 'fsdp') mesh; one of the two sizes may be -1 (= all remaining devices)."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    n = devices.size
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
    data = n // fsdp if data == -1 else data
    fsdp = n // data if fsdp == -1 else fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} devices")
    return Mesh(devices.reshape(data, fsdp), BATCH_AXES)


def check_batch(global_batch, mesh, accumulate=1):
    """Refuse, before compiling, a batch that the devices (and accumulation steps) do not divide."""
    n = mesh.size * accumulate
    if global_batch % n:
        raise ValueError(f"the global batch of {global_batch} is not divisible by {mesh.size} devices"
                         + (f" x {accumulate} accumulation steps" if accumulate > 1 else "")
                         + f"; use a multiple of {n}")
    if global_batch % jax.process_count():
        raise ValueError(f"the global batch of {global_batch} is not divisible by "
                         f"{jax.process_count()} processes")


def batch_sharding(mesh):
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
    return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size, min_size):
    """Shard the largest dimension divisible by the fsdp size; replicate small arrays."""
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh, min_size=2 ** 16):
    """NamedShardings for every array of `tree` (arrays or ShapeDtypeStructs) by `fsdp_spec`."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda a: NamedSharding(mesh, fsdp_spec(tuple(getattr(a, "shape", ())), fsdp, min_size)), tree)


def host_init(init, rng, shardings):
    """`init(rng)` (a pytree of arrays: fresh parameters) computed by the host CPU and placed on
    `shardings` (a matching pytree, or one sharding for all), every process building the same
    values and keeping its own shards.

    Flax's `init` is one random draw per parameter: XLA compiles that program several times faster
    for the CPU than for a GPU (2.5 min for the 872M UNet on an H100), and it runs once.
    """
    cpu = jax.local_devices(backend="cpu")[0]
    host = jax.jit(init, out_shardings=jax.sharding.SingleDeviceSharding(cpu))(jax.device_put(rng, cpu))
    return put_global(host, shardings)


def compile_together(fn, *args):
    """Compile the jitted `fn` for `args` and return once every process has compiled its copy:
    processes compile at different speeds, and CPU (gloo) collectives give a late peer only 30 s
    before they fail. Then call `fn` itself: jit keeps the executable, and its calls dispatch the
    step's thousands of state arrays faster than a `Compiled` object's (CPU, 2,800 arrays: 9.0
    against 12.8 ms)."""
    fn.lower(*args).compile()
    if jax.process_count() > 1:
        from jax._src import distributed  # the coordination service's barrier: no device collective

        _BARRIERS[0] += 1  # every process compiles the same programs in the same order
        distributed.global_state.client.wait_at_barrier(f"latentdiff_compiled_{_BARRIERS[0]}", 3600 * 1000)


_BARRIERS = [0]


def on_leaves(step, treedef):
    """`step(state, *args) -> (state, out)` as `(leaves, *args) -> (leaves, out)` for a state of
    structure `treedef`: a loop that keeps the state's leaves in a list between steps spares jit
    flattening the nested state on every call and building it again from the outputs (CPU, the
    txt2img UNet's no-EMA state of 2,061 arrays: 7.1-7.4 -> 5.6-5.7 ms of host time per call; H200,
    its step waited for: 0.1077 -> 0.1060 s)."""
    def flat(leaves, *args):
        new, out = step(jax.tree_util.tree_unflatten(treedef, leaves), *args)
        return jax.tree_util.tree_leaves(new), out
    return flat


def to_host(tree):
    """Numpy copies of (possibly sharded) arrays; with several processes a collective that every
    process must call (each gets the whole arrays)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def put_global(tree, shardings):
    """Place values that every process holds alike (weights, the same prompts and noise) on
    `shardings` (one for all, or a matching pytree): `device_put` in one process; with several,
    each process fills its own devices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def to_global(batch, mesh):
    """Host-local numpy batch (this process's share) -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
