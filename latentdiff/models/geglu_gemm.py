"""GEGLU's projection with its gate as the GEMM's epilogue: one Pallas Mosaic GPU kernel (Hopper).

`value * gelu(gate)` for `[value | gate] = x @ w + b`, computed from the float32 accumulator: the
projection (twice the output's size) is neither written to memory nor read back by a gate kernel, as
XLA's GEMM and its elementwise gate do (at the txt2img UNet's level 0 in the guided sampling loop:
97 us of GEMM and 71 us of gate, BENCHMARKS.md, session 18).

Layout: each compute warpgroup accumulates a tile of `rows` x 128 columns of the projection whose first
64 columns are values and last 64 their gates, so the weight's columns are reordered once
(`pair_columns`) into blocks of [64 values | the same 64 gates]. The kernel is persistent (one CTA per
SM, walking the output tiles), warp-specialized (a memory warpgroup streams x and w through shared
memory with TMA; two compute warpgroups run WGMMA), and its epilogue adds the bias, applies the exact
(erf) GELU in float32 and writes the output through shared memory with TMA.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from latentdiff.models.layers import dense_apply, geglu, in_forward_mode

HALF = 64  # output columns per warpgroup tile (its accumulator: 64 values, then their 64 gates)
EPI_ROWS = 64  # rows per epilogue store
_SQRT_HALF = 0.7071067811865476


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The kernel's tiling. `split`: the CTA's two compute warpgroups take different rows ("m") or
    different column pairs ("n"); `group`: tiles are visited in runs of `group` along the minor
    dimension `minor` ("m" or "n"), for L2 reuse of the operand shared by a run."""

    rows: int = 128
    depth: int = 64
    stages: int = 3
    split: str = "m"
    minor: str = "m"
    group: int = 8

    def cta(self):
        """(rows, projection columns) of one CTA tile."""
        return (self.rows * (2 if self.split == "m" else 1), 2 * HALF * (2 if self.split == "n" else 1))


def pair_columns(w, b):
    """w (K, 2I), b (2I,) with the values' columns first and the gates' after -> the same values with
    the columns in blocks of [64 values | their 64 gates], as the kernel's warpgroup tiles hold them."""
    k, two_i = w.shape
    i = two_i // 2
    if i % HALF:
        raise ValueError(f"GEGLU width {i} is not a multiple of {HALF}")
    blocks = lambda a: a.reshape(*a.shape[:-1], i // HALF, HALF)  # noqa: E731
    wp = jnp.stack([blocks(w[:, :i]), blocks(w[:, i:])], axis=-2).reshape(k, two_i)
    bp = jnp.stack([blocks(b[:i]), blocks(b[i:])], axis=-2).reshape(two_i)
    return wp, bp


def fits(m, k, two_i, tiles=Tiles()):
    """Whether x (m, k) @ w (k, two_i) splits into the kernel's tiles."""
    cta_rows, cta_cols = tiles.cta()
    return m % cta_rows == 0 and two_i % cta_cols == 0 and k % tiles.depth == 0


def _kernel(x_gmem, w_gmem, b_gmem, out_gmem, *, tiles):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_gmem.shape
    cta_rows, cta_cols = tiles.cta()
    m_tiles, n_tiles, steps = m // cta_rows, w_gmem.shape[1] // cta_cols, k // tiles.depth
    item = jnp.dtype(x_gmem.dtype).itemsize
    swizzle = plgpu.find_swizzle(tiles.depth * item * 8)
    operand = (plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle))
    out_item = jnp.dtype(out_gmem.dtype).itemsize
    out_swizzle = plgpu.find_swizzle(HALF * out_item * 8)
    stored = (plgpu.TilingTransform((8, out_swizzle // out_item)), plgpu.SwizzleTransform(out_swizzle))
    by_rows = tiles.split == "m"

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), memory_registers=40, max_concurrent_steps=tiles.stages,
            in_specs=[plgpu.BlockSpec((cta_rows, tiles.depth), lambda s: (0, s), transforms=operand,
                                      memory_space=plgpu.SMEM),
                      plgpu.BlockSpec((tiles.depth, cta_cols), lambda s: (s, 0), transforms=operand,
                                      memory_space=plgpu.SMEM)],
            wg_axis="wg", num_compute_wgs=2, compute_context=context)

    nothing = lambda *_, **__: None  # noqa: E731  (the allocations do not depend on the bodies)

    @functools.partial(pl.run_scoped,
                       buffers=pipeline(nothing, nothing).get_allocations(x_gmem, w_gmem),
                       out_smem=plgpu.SMEM((2, 2, EPI_ROWS, HALF), out_gmem.dtype, transforms=stored),
                       bias_smem=plgpu.SMEM((2, 2, EPI_ROWS, HALF), out_gmem.dtype, transforms=stored),
                       bias_ready=plgpu.Barrier(num_barriers=4),
                       collective_axes="wg")
    def _scope(buffers, out_smem, bias_smem, bias_ready):
        wg = jax.lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile(info):
            (lin,) = info.index
            m_idx, n_idx = plgpu.planar_snake(lin, (m_tiles, n_tiles), 0 if tiles.minor == "m" else 1,
                                              tiles.group)
            row0 = m_idx * cta_rows + (wg * tiles.rows if by_rows else 0)
            pair = n_idx * (cta_cols // (2 * HALF)) + (0 if by_rows else wg)  # this warpgroup's block

            def context(run):
                for half in (0, 1):  # the bias rows of the values, then of the gates, fetched early
                    plgpu.copy_gmem_to_smem(b_gmem.at[:, pl.ds((2 * pair + half) * HALF, HALF)],
                                            bias_smem.at[wg, half], bias_ready.at[2 * wg + half])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tiles.rows, 2 * HALF), jnp.float32))
                def _acc(acc_ref):
                    run(acc_ref)
                    acc = acc_ref[...]
                    for half in (0, 1):
                        plgpu.barrier_wait(bias_ready.at[2 * wg + half])
                    for r in range(tiles.rows // EPI_ROWS):
                        rows = slice(r * EPI_ROWS, (r + 1) * EPI_ROWS)
                        value = acc[rows, :HALF] + bias_smem[wg, 0].astype(jnp.float32)
                        gate = acc[rows, HALF:] + bias_smem[wg, 1].astype(jnp.float32)
                        y = value * (0.5 * gate * (1.0 + jax.lax.erf(gate * _SQRT_HALF)))
                        slot = r % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        out_smem[wg, slot] = y.astype(out_gmem.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                                out_gmem.at[pl.ds(row0 + r * EPI_ROWS, EPI_ROWS),
                                                            pl.ds(pair * HALF, HALF)])

            def mma(_, x_smem, w_smem, acc_ref):
                x_rows = x_smem.at[pl.ds(wg * tiles.rows, tiles.rows)] if by_rows else x_smem
                w_cols = w_smem if by_rows else w_smem.at[:, pl.ds(wg * 2 * HALF, 2 * HALF)]
                plgpu.wgmma(acc_ref, x_rows, w_cols)
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma, context)(x_gmem.at[pl.ds(m_idx * cta_rows, cta_rows), :],
                                   w_gmem.at[:, pl.ds(n_idx * cta_cols, cta_cols)], allocations=buffers)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def geglu_matmul(x, w_paired, b_paired, tiles=Tiles(), *, sms=None, interpret=None):
    """value * gelu(gate) of x (m, k) @ w_paired (k, 2I) + b_paired (2I,) (`pair_columns` order) ->
    (m, I) in x's dtype. `sms`: CTAs to launch (default: the device's SM count); `interpret`:
    Pallas' GPU interpreter parameters, to run on a CPU."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    two_i = w_paired.shape[1]
    if not fits(m, k, two_i, tiles):
        raise ValueError(f"x {x.shape} @ w {w_paired.shape} does not split into {tiles}")
    if sms is None:
        sms = jax.devices()[0].core_count
    bias_rows = jnp.broadcast_to(b_paired.astype(x.dtype)[None], (EPI_ROWS, two_i))
    call = plgpu.kernel(functools.partial(_kernel, tiles=tiles),
                        out_type=jax.ShapeDtypeStruct((m, two_i // 2), x.dtype),
                        grid=(sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                        interpret=interpret)
    return call(x, w_paired.astype(x.dtype), bias_rows)


def tiles_for(m):
    """The tiling for m rows (session 18's probe of the plain GEMM: warpgroups split the rows at the
    UNet's level 0, the column pairs deeper)."""
    return Tiles(split="m") if m >= 16384 else Tiles(split="n", minor="n")


def _kernel_ok(x, kernel, dtype):
    """Whether the kernel can run here: one Hopper GPU, bf16 compute, shapes that split into its tiles.
    With several devices a program's batch may be sharded, and XLA cannot partition the kernel's custom
    call (it would gather the operands): not before a `shard_map` around it."""
    device = jax.devices()[0]
    if (jax.device_count() != 1 or device.platform != "gpu"
            or getattr(device, "compute_capability", "") != "9.0"):
        return False
    m = x.size // x.shape[-1]
    return jnp.dtype(dtype) == jnp.bfloat16 and fits(m, x.shape[-1], kernel.shape[1], tiles_for(m))


def _xla_path(x, kernel, bias, dtype):
    return geglu(dense_apply(x, kernel, bias, dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x, kernel, bias, dtype):
    wp, bp = pair_columns(kernel.astype(dtype), bias.astype(jnp.float32))
    flat = x.reshape(-1, x.shape[-1]).astype(dtype)
    return geglu_matmul(flat, wp, bp, tiles_for(flat.shape[0])).reshape(*x.shape[:-1], -1)


def _fused_fwd(x, kernel, bias, dtype):  # differentiated: XLA's GEMM and the gate's own VJP
    return jax.vjp(lambda a, k, b: _xla_path(a, k, b, dtype), x, kernel, bias)


def _fused_bwd(dtype, pullback, g):
    return pullback(g)


_fused.defvjp(_fused_fwd, _fused_bwd)


def gated_projection(x, kernel, bias, dtype):
    """GEGLU's `geglu(x @ kernel + bias)` in `dtype`. Where nothing differentiates it, on a Hopper GPU,
    one kernel with the gate as its epilogue (`geglu_matmul`); differentiated (training), XLA's GEMM and
    the gate's custom VJP, as `Dense` then `geglu`; in `forward_mode`, the plain functions."""
    if in_forward_mode() or not _kernel_ok(x, kernel, dtype):
        return _xla_path(x, kernel, bias, dtype)
    return _fused(x, kernel, bias, dtype)
