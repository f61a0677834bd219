"""A model's parameters stored stacked by shape: one array per (shape, dtype), not one per parameter.

A jitted step pays host time for every array it takes and returns (flattening, argument checks,
buffer tables: about 5 us each on a GPU, before the first kernel can start). The txt2img UNet has
686 parameters of 46 shapes; with its EMA and AdamW's two moments a train step moved 2,744 arrays.
`Packed` holds them as 46 stacks, and AdamW, the EMA and the finite guard, all elementwise, work
on it leaf by leaf as before (weight decay and the global gradient norm are the same sums). The
model is given `unpack()`'s views: slices that XLA fuses into their users (the cast to the compute
dtype), and the gradient of those views is stacked back with `pack_like`.
"""
import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_pytree_with_keys_class
class Packed:
    """Stacked parameters: `stacks[g]` has shape (members, *shape) of group g. `layout` (static) is
    (treedef of the parameter tree, per group (shape, dtype name, the members' leaf indices))."""

    def __init__(self, stacks, layout):
        self.stacks, self.layout = tuple(stacks), layout

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.DictKey("x".join(map(str, shape)) + f"_{dtype}") for shape, dtype, _ in self.layout[1]]
        return list(zip(keys, self.stacks)), self.layout

    def tree_flatten(self):
        return self.stacks, self.layout

    @classmethod
    def tree_unflatten(cls, layout, stacks):
        return cls(stacks, layout)

    def unpack(self):
        """The parameter tree, each parameter a view (slice) of its stack."""
        treedef, groups = self.layout
        leaves = [None] * treedef.num_leaves
        for stack, (_, _, members) in zip(self.stacks, groups):
            for j, i in enumerate(members):
                leaves[i] = stack[j]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def __repr__(self):
        return f"Packed({len(self.stacks)} stacks of {self.layout[0].num_leaves} parameters)"


def pack(tree):
    """Stack a parameter tree's arrays by (shape, dtype), groups in order of first appearance."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    groups = {}
    for i, x in enumerate(leaves):
        groups.setdefault((tuple(x.shape), np.dtype(x.dtype).name), []).append(i)
    layout = (treedef, tuple((shape, dtype, tuple(members)) for (shape, dtype), members in groups.items()))
    return pack_like(layout, tree)


def pack_like(layout, tree):
    """`tree` (the parameter tree's structure) stacked in `layout`'s groups (a Packed's layout).

    Each member is written into its slot of a zero stack (XLA updates it in place), so that under
    jit a member's buffer can be freed as soon as it is written: a gradient computed early in the
    backward pass need not live until every other member of its stack exists, as for a concatenation."""
    leaves = jax.tree_util.tree_leaves(tree)
    stacks = []
    for shape, dtype, members in layout[1]:
        stack = jnp.zeros((len(members),) + tuple(shape), dtype)
        for j, i in enumerate(members):
            stack = stack.at[j].set(leaves[i])
        stacks.append(stack)
    return Packed(stacks, layout)


def unpack(x):
    """A Packed's parameter tree; anything else as it is."""
    return x.unpack() if isinstance(x, Packed) else x
