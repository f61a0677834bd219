"""Where the library's Pallas Mosaic GPU kernels (`geglu_gemm`, `split_k_gemm`) run."""
import jax


def hopper_gpu(device):
    """Whether `device` is a Hopper GPU (compute capability 9.0), where the kernels compile."""
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def one_hopper_gpu():
    """Whether the program runs on exactly one device, a Hopper GPU. With several devices a program's
    batch may be sharded, and XLA cannot partition a kernel's custom call (it would gather the
    operands): not before a `shard_map` around it."""
    return jax.device_count() == 1 and hopper_gpu(jax.devices()[0])
