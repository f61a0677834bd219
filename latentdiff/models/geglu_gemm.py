"""GEGLU's projection with its gate as the GEMM's epilogue: one Pallas Mosaic GPU kernel (Hopper).

`value * gelu(gate)` for `[value | gate] = x @ w + b`, computed from the float32 accumulator: the
projection (twice the output's size) is neither written to memory nor read back by a gate kernel, as
XLA's GEMM and its elementwise gate do (at the txt2img UNet's level 0 in the guided sampling loop:
97 us of GEMM and 71 us of gate, BENCHMARKS.md, session 18).

Layout: each compute warpgroup accumulates, for `rows` rows, 64 value columns and the same 64 columns
of the gates in two accumulators, read from the weight where they are (the values' block and the gates'
block I columns further), so the weight is used as stored. The kernel is persistent (one CTA per SM,
walking the output tiles), warp-specialized (a memory warpgroup streams x and both weight blocks through
shared memory with TMA; two compute warpgroups run WGMMA), and its epilogue adds the bias, applies the
exact (erf) GELU in float32 and writes the output through shared memory with TMA.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from latentdiff.models.layers import _SQRT_HALF, computed_by, dense_apply, geglu

HALF = 64  # output columns per warpgroup tile (two accumulators: 64 values and their 64 gates)
EPI_ROWS = 64  # rows per epilogue store
# erf in float32 as x * P(x^2) / Q(x^2) on [-4, 4] (the rational form XLA and Eigen use; within 5e-7 of
# lax.erf): Mosaic GPU's Warpgroup lowering has no layout rule for math.erf.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _horner(coefficients, x):
    out = coefficients[0]
    for c in coefficients[1:]:
        out = out * x + c
    return out


def erf(x):
    """float32 erf from multiplies, adds and one division (see _ERF_P)."""
    x = jnp.minimum(jnp.maximum(x, -4.0), 4.0)
    x2 = x * x
    return x * _horner(_ERF_P, x2) / _horner(_ERF_Q, x2)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The kernel's tiling. `split`: the CTA's two compute warpgroups take different rows ("m") or
    different 64-column blocks ("n"); `group`: tiles are visited in runs of `group` along the minor
    dimension `minor` ("m" or "n"), for L2 reuse of the operand shared by a run."""

    rows: int = 128
    depth: int = 64
    stages: int = 3
    split: str = "m"
    minor: str = "m"
    group: int = 8

    def cta(self):
        """(rows, value columns) of one CTA tile (it reads as many gate columns)."""
        return (self.rows * (2 if self.split == "m" else 1), HALF * (2 if self.split == "n" else 1))


def fits(m, k, two_i, tiles=Tiles()):
    """Whether x (m, k) @ w (k, two_i) splits into the kernel's tiles."""
    cta_rows, cta_cols = tiles.cta()
    return m % cta_rows == 0 and (two_i // 2) % cta_cols == 0 and k % tiles.depth == 0 and two_i % 2 == 0


def _kernel(x_gmem, w_gmem, b_gmem, out_gmem, *, tiles):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_gmem.shape
    width = w_gmem.shape[1] // 2  # the gates' columns start here
    cta_rows, cta_cols = tiles.cta()
    m_tiles, n_tiles, steps = m // cta_rows, width // cta_cols, k // tiles.depth
    item = jnp.dtype(x_gmem.dtype).itemsize
    swizzle = plgpu.find_swizzle(tiles.depth * item * 8)
    operand = (plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle))
    out_item = jnp.dtype(out_gmem.dtype).itemsize
    out_swizzle = plgpu.find_swizzle(HALF * out_item * 8)
    stored = (plgpu.TilingTransform((8, out_swizzle // out_item)), plgpu.SwizzleTransform(out_swizzle))
    by_rows = tiles.split == "m"
    w_spec = plgpu.BlockSpec((tiles.depth, cta_cols), lambda s: (s, 0), transforms=operand,
                             memory_space=plgpu.SMEM)

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), memory_registers=40, max_concurrent_steps=tiles.stages,
            in_specs=[plgpu.BlockSpec((cta_rows, tiles.depth), lambda s: (0, s), transforms=operand,
                                      memory_space=plgpu.SMEM), w_spec, w_spec],
            wg_axis="wg", num_compute_wgs=2, compute_context=context)

    nothing = lambda *_, **__: None  # noqa: E731  (the allocations do not depend on the bodies)

    @functools.partial(pl.run_scoped,
                       buffers=pipeline(nothing, nothing).get_allocations(x_gmem, w_gmem, w_gmem),
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
            col0 = n_idx * cta_cols + (0 if by_rows else wg * HALF)  # this warpgroup's value columns

            def context(run):
                for half, col in enumerate((col0, width + col0)):  # the bias rows, fetched early
                    plgpu.copy_gmem_to_smem(b_gmem.at[:, pl.ds(col, HALF)], bias_smem.at[wg, half],
                                            bias_ready.at[2 * wg + half])

                @functools.partial(pl.run_scoped, value_ref=plgpu.ACC((tiles.rows, HALF), jnp.float32),
                                   gate_ref=plgpu.ACC((tiles.rows, HALF), jnp.float32))
                def _acc(value_ref, gate_ref):
                    run((value_ref, gate_ref))
                    values, gates = value_ref[...], gate_ref[...]
                    for half in (0, 1):
                        plgpu.barrier_wait(bias_ready.at[2 * wg + half])
                    for r in range(tiles.rows // EPI_ROWS):
                        rows = slice(r * EPI_ROWS, (r + 1) * EPI_ROWS)
                        value = values[rows] + bias_smem[wg, 0].astype(jnp.float32)
                        gate = gates[rows] + bias_smem[wg, 1].astype(jnp.float32)
                        y = value * (0.5 * gate * (1.0 + erf(gate * _SQRT_HALF)))
                        slot = r % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        out_smem[wg, slot] = y.astype(out_gmem.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                                out_gmem.at[pl.ds(row0 + r * EPI_ROWS, EPI_ROWS),
                                                            pl.ds(col0, HALF)])

            def mma(_, x_smem, value_smem, gate_smem, accs):
                x_rows = x_smem.at[pl.ds(wg * tiles.rows, tiles.rows)] if by_rows else x_smem
                for acc, w_smem in zip(accs, (value_smem, gate_smem)):
                    plgpu.wgmma(acc, x_rows, w_smem if by_rows else w_smem.at[:, pl.ds(wg * HALF, HALF)])
                plgpu.wgmma_wait(0)
                return accs

            cols = lambda start: w_gmem.at[:, pl.ds(start, cta_cols)]  # noqa: E731
            pipeline(mma, context)(x_gmem.at[pl.ds(m_idx * cta_rows, cta_rows), :], cols(n_idx * cta_cols),
                                   cols(width + n_idx * cta_cols), allocations=buffers)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def geglu_matmul(x, w, b, tiles=Tiles(), *, sms=None, interpret=None):
    """value * gelu(gate) of [value | gate] = x (m, k) @ w (k, 2I) + b (2I,) -> (m, I) in x's dtype.
    `sms`: CTAs to launch (default: the device's SM count); `interpret`: Pallas' GPU interpreter
    parameters, to run on a CPU."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    two_i = w.shape[1]
    if not fits(m, k, two_i, tiles):
        raise ValueError(f"x {x.shape} @ w {w.shape} does not split into {tiles}")
    if sms is None:
        sms = jax.devices()[0].core_count
    bias_rows = jnp.broadcast_to(b.astype(x.dtype)[None], (EPI_ROWS, two_i))
    def geglu_gemm(*refs):  # the kernel's name in profiles
        _kernel(*refs, tiles=tiles)

    call = plgpu.kernel(geglu_gemm,
                        out_type=jax.ShapeDtypeStruct((m, two_i // 2), x.dtype),
                        grid=(sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                        interpret=interpret)
    return call(x, w.astype(x.dtype), bias_rows)


def tiles_for(m):
    """The tiling for m rows, the best of 16 timed on an H200 at the txt2img UNet's four shapes (session 19):
    the warpgroups split the rows at level 0 (32,768 rows), the column blocks deeper, where the tiles
    are visited in runs of 8 along the rows."""
    return Tiles(split="m") if m >= 16384 else Tiles(split="n", minor="m")


def hopper_gpu(device):
    """Whether `device` is a Hopper GPU (compute capability 9.0), where the kernel compiles."""
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def _kernel_ok(x, kernel, dtype):
    """Whether the kernel can run here: one Hopper GPU, bf16 compute, shapes that split into its tiles.
    With several devices a program's batch may be sharded, and XLA cannot partition the kernel's custom
    call (it would gather the operands): not before a `shard_map` around it."""
    if jax.device_count() != 1 or not hopper_gpu(jax.devices()[0]):
        return False
    m = x.size // x.shape[-1]
    return jnp.dtype(dtype) == jnp.bfloat16 and fits(m, x.shape[-1], kernel.shape[1], tiles_for(m))


def _xla_path(x, kernel, bias, dtype):
    return geglu(dense_apply(x, kernel, bias, dtype))


def _kernel_path(x, kernel, bias, dtype):
    flat = x.reshape(-1, x.shape[-1]).astype(dtype)
    return geglu_matmul(flat, kernel, bias, tiles_for(flat.shape[0])).reshape(*x.shape[:-1], -1)


def gated_projection(x, kernel, bias, dtype):
    """GEGLU's `geglu(x @ kernel + bias)` in `dtype`. Where nothing differentiates it, on a Hopper GPU,
    one kernel with the gate as its epilogue (`geglu_matmul`); differentiated (training), XLA's GEMM and
    the gate's custom VJP, as `Dense` then `geglu`; in `forward_mode`, the plain functions."""
    if not _kernel_ok(x, kernel, dtype):
        return _xla_path(x, kernel, bias, dtype)
    return computed_by(functools.partial(_kernel_path, dtype=dtype), functools.partial(_xla_path, dtype=dtype),
                       x, kernel, bias)
