"""Split-K GEMM: one Pallas Mosaic GPU kernel (Hopper) for products whose output leaves SMs idle.

`x (m, k) @ w (n, k).T` in `splits` slices of the reduction, each slice's product written as a float32
partial, `(splits, m, n)`, that XLA sums with whatever follows (the bias, a residual) in one fusion.
At the txt2img UNet's 4x4 level in the guided loop at batch 16, a convolution's output is 512 x 1280:
40 tiles of 128 x 128 for 132 SMs, so cuDNN runs it on a third of the GPU (BENCHMARKS.md, session 20);
in three slices 120 CTAs share it.

`w` is read as stored, (n, k) (a convolution's kernel (out, 3, 3, in) is that, flattened): its blocks
are transposed in shared memory for WGMMA, as JAX's own Mosaic GPU attention reads its keys. The
kernel is persistent (one CTA per SM, walking the (slice, row tile, column tile) tiles) and
warp-specialized: a memory warpgroup streams x's and w's blocks through shared memory with TMA, two
compute warpgroups each accumulate half the tile's columns with WGMMA and store their float32 partial
through shared memory with TMA.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

EPI_ROWS = 64  # rows per epilogue store
MAX_SPLITS = 8


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A CTA's tile: `rows` x `cols` of the output (each compute warpgroup takes `cols // 2` columns),
    reduced `depth` at a time through `stages` shared-memory buffers."""

    rows: int = 128
    cols: int = 128
    depth: int = 64
    stages: int = 4


def fits(m, k, n, splits, tiles=Tiles()):
    """Whether x (m, k) @ w (n, k).T splits into the kernel's tiles and `splits` slices of k."""
    return (splits >= 1 and m % tiles.rows == 0 and tiles.rows % EPI_ROWS == 0 and n % tiles.cols == 0
            and (tiles.cols // 2) % 32 == 0 and k % (splits * tiles.depth) == 0)


def splits_for(m, k, n, sms, tiles=Tiles()):
    """The most slices (at most MAX_SPLITS) whose tiles all run at once on `sms` SMs and that divide
    k into whole steps; 1 where the output alone fills the SMs or does not split into tiles."""
    if not fits(m, k, n, 1, tiles):
        return 1
    tiles_n = (m // tiles.rows) * (n // tiles.cols)
    return max(s for s in range(1, MAX_SPLITS + 1) if s == 1 or (s * tiles_n <= sms and fits(m, k, n, s, tiles)))


def _kernel(x_gmem, w_gmem, out_gmem, *, splits, tiles, w_transposed):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_gmem.shape
    n = w_gmem.shape[1] if w_transposed else w_gmem.shape[0]
    half = tiles.cols // 2
    m_tiles, n_tiles = m // tiles.rows, n // tiles.cols
    k_slice = k // splits
    item = jnp.dtype(x_gmem.dtype).itemsize
    swizzle = plgpu.find_swizzle(tiles.depth * item * 8)
    operand = (plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(half * 4 * 8)
    stored = (plgpu.TilingTransform((8, out_swizzle // 4)), plgpu.SwizzleTransform(out_swizzle))
    if w_transposed:  # w (k, n): Pallas' interpreter has no transposed views
        w_spec = plgpu.BlockSpec((tiles.depth, tiles.cols), lambda s: (s, 0), transforms=(
            plgpu.TilingTransform((8, plgpu.find_swizzle(tiles.cols * item * 8) // item)),
            plgpu.SwizzleTransform(plgpu.find_swizzle(tiles.cols * item * 8))), memory_space=plgpu.SMEM)
    else:
        w_spec = plgpu.BlockSpec((tiles.cols, tiles.depth), lambda s: (0, s), transforms=operand,
                                 memory_space=plgpu.SMEM)

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_slice // tiles.depth,), memory_registers=40, max_concurrent_steps=tiles.stages,
            in_specs=[plgpu.BlockSpec((tiles.rows, tiles.depth), lambda s: (0, s), transforms=operand,
                                      memory_space=plgpu.SMEM), w_spec],
            wg_axis="wg", num_compute_wgs=2, compute_context=context)

    nothing = lambda *_, **__: None  # noqa: E731  (the allocations do not depend on the bodies)

    @functools.partial(pl.run_scoped, buffers=pipeline(nothing, nothing).get_allocations(x_gmem, w_gmem),
                       out_smem=plgpu.SMEM((2, 2, EPI_ROWS, half), jnp.float32, transforms=stored),
                       collective_axes="wg")
    def _scope(buffers, out_smem):
        wg = jax.lax.axis_index("wg")

        @plgpu.nd_loop((splits * m_tiles * n_tiles,), collective_axes="sm")
        def _tile(info):
            (lin,) = info.index
            split, rest = lin // (m_tiles * n_tiles), lin % (m_tiles * n_tiles)
            m_idx, n_idx = rest // n_tiles, rest % n_tiles
            row0 = split * m + m_idx * tiles.rows  # in the (splits * m, n) partials
            col0 = n_idx * tiles.cols + wg * half

            def context(run):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tiles.rows, half), jnp.float32))
                def _acc(acc_ref):
                    run(acc_ref)
                    acc = acc_ref[...]
                    for r in range(tiles.rows // EPI_ROWS):
                        slot = r % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        out_smem[wg, slot] = acc[r * EPI_ROWS:(r + 1) * EPI_ROWS]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                                out_gmem.at[pl.ds(row0 + r * EPI_ROWS, EPI_ROWS),
                                                            pl.ds(col0, half)])

            def mma(_, x_smem, w_smem, acc):
                if w_transposed:
                    w_cols = w_smem.at[:, pl.ds(wg * half, half)]
                else:
                    w_cols = plgpu.transpose_ref(w_smem.at[pl.ds(wg * half, half)], (1, 0))
                plgpu.wgmma(acc, x_smem, w_cols)
                plgpu.wgmma_wait(0)
                return acc

            k_cols = pl.ds(split * k_slice, k_slice)
            w_block = (w_gmem.at[k_cols, pl.ds(n_idx * tiles.cols, tiles.cols)] if w_transposed
                       else w_gmem.at[pl.ds(n_idx * tiles.cols, tiles.cols), k_cols])
            pipeline(mma, context)(x_gmem.at[pl.ds(m_idx * tiles.rows, tiles.rows), k_cols], w_block,
                                   allocations=buffers)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def split_k_matmul(x, w, splits, tiles=Tiles(), *, sms=None, interpret=None):
    """The float32 partials (splits, m, n) of x (m, k) @ w (n, k).T, the reduction cut in `splits`
    equal slices (their sum is the product). `sms`: CTAs to launch (default: the device's SM count);
    `interpret`: Pallas' GPU interpreter parameters, to run on a CPU."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or not fits(m, k, n, splits, tiles):
        raise ValueError(f"x {x.shape} @ w {w.shape}.T does not split into {splits} slices of {tiles}")
    if sms is None:
        sms = jax.devices()[0].core_count
    w_transposed = interpret is not None

    def split_k_gemm(*refs):  # the kernel's name in profiles
        _kernel(*refs, splits=splits, tiles=tiles, w_transposed=w_transposed)

    call = plgpu.kernel(split_k_gemm,
                        out_type=jax.ShapeDtypeStruct((splits * m, n), jnp.float32),
                        grid=(sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                        interpret=interpret)
    w = w.astype(x.dtype)
    return call(x, w.T if w_transposed else w).reshape(splits, m, n)


def taps_side_by_side(x, stride=1):
    """The 3x3 taps (padding 1) of each output of a convolution of stride `stride`, side by side:
    (B, H, W, C) -> (B, H', W', 9C) in (row tap, column tap, channel) order, the order of a kernel
    (out, 3, 3, in) flattened to (out, 9 in)."""
    h, w = x.shape[1:3]
    rows, cols = (h - 1) // stride + 1, (w - 1) // stride + 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([padded[:, i:i + stride * (rows - 1) + 1:stride, j:j + stride * (cols - 1) + 1:stride]
                            for i in range(3) for j in range(3)], axis=-1)


def conv3x3_split_k(x, kernel, *, stride, splits, dtype, **options):
    """A 3x3 convolution of padding 1 (NHWC x, kernel (out, 3, 3, in)) in `dtype` as the split-K GEMM
    of its taps side by side; `options` go to `split_k_matmul`."""
    patches = taps_side_by_side(x.astype(dtype), stride)
    flat = patches.reshape(-1, patches.shape[-1])
    partials = split_k_matmul(flat, kernel.reshape(kernel.shape[0], -1).astype(dtype), splits, **options)
    return partials.sum(0).astype(dtype).reshape(*patches.shape[:-1], kernel.shape[0])


def conv_splits(x, kernel, stride, padding, dtype):
    """Slices of the reduction in which `Conv2D` runs a convolution through `conv3x3_split_k`: on one
    Hopper GPU, in bf16, for a 3x3 kernel of padding 1 whose output tiles leave SMs idle (at batch 16
    in the guided loop, the txt2img UNet's 4x4 level and the convolution into it); else 1 (cuDNN)."""
    from latentdiff.models.hopper import one_hopper_gpu

    if kernel.shape[1:3] != (3, 3) or padding != 1 or jnp.dtype(dtype) != jnp.bfloat16 or not one_hopper_gpu():
        return 1
    b, h, w, c = x.shape
    m = b * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    return splits_for(m, 9 * c, kernel.shape[0], jax.devices()[0].core_count)
