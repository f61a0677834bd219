"""LPIPS, PatchGAN discriminator and autoencoder-loss parity with PyTorch (random weights)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiff.convert.lpips_weights import main as convert_main
from latentdiff.losses import autoencoder_loss as L
from latentdiff.losses.discriminator import NLayerDiscriminator, discriminator_variables_from_torch
from latentdiff.losses.lpips import LPIPS, load_lpips_params
from tests.torch_utils import nchw, nhwc, peer_models, rel_err, state_dict_numpy

torch = pytest.importorskip("torch")
tnn = torch.nn

TOL = 1e-4
# torch references: taming's LPIPS and NLayerDiscriminator, also the benchmark's peers
TorchLPIPS, torch_discriminator = peer_models().TorchLPIPS, peer_models().torch_discriminator


def flax_discriminator(tdisc, ndf, n_layers, size):
    disc = NLayerDiscriminator(ndf=ndf, n_layers=n_layers)
    shapes = jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return disc, discriminator_variables_from_torch(state_dict_numpy(tdisc), shapes)


def _images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def lpips_pair(tmp_path_factory):
    torch.manual_seed(0)
    tm = TorchLPIPS().eval()
    d = tmp_path_factory.mktemp("lpips")
    torch.save(tm.net.state_dict(), d / "vgg16.pth")
    torch.save({k: v for k, v in tm.state_dict().items() if k.startswith("lin")}, d / "vgg.pth")
    out = str(d / "lpips_vgg16.safetensors")
    convert_main(["--vgg", str(d / "vgg16.pth"), "--lin", str(d / "vgg.pth"), "--out", out])
    return tm, load_lpips_params(out)


# ----------------------------------------------------------------------------- LPIPS


def test_lpips_parity(lpips_pair):
    tm, params = lpips_pair
    x0, x1 = _images((2, 64, 64, 3), 0), _images((2, 64, 64, 3), 1)
    t1 = nchw(x1).requires_grad_(True)
    ref = tm(nchw(x0), t1)
    ref.sum().backward()

    def value(a, b):
        out = LPIPS().apply({"params": params}, a, b)
        return out.sum(), out

    (_, out), grad = jax.jit(jax.value_and_grad(value, argnums=1, has_aux=True))(x0, x1)
    assert out.shape == (2, 1, 1, 1)
    assert rel_err(out.reshape(2), ref.detach().numpy().reshape(2)) <= TOL
    # Input gradient, compared in relative L2: with random VGG weights a relu2_2 pre-activation of
    # ~1e-6 flips sign between the frameworks' float32 sums and moves one element by ~2e-3 of
    # the max (both agree with float64 torch to 1e-7 when the same mask is used).
    g_ref = nhwc(t1.grad)
    assert np.linalg.norm(np.asarray(grad) - g_ref) <= 1e-3 * np.linalg.norm(g_ref)
    same = LPIPS().apply({"params": params}, x0, x0, keepdims=False)
    assert same.shape == (2,) and np.all(np.asarray(same) == 0.0)


def test_lpips_missing_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_lpips_params(str(tmp_path / "lpips_vgg16.safetensors"))
    msg = str(e.value)
    for needed in ("vgg16-397923af.pth", "vgg.pth", "d507d7349b931f0638a25a48a722f98a",
                   "python -m latentdiff.convert.lpips_weights"):
        assert needed in msg


# ----------------------------------------------------------------------------- discriminator


def test_discriminator_parity_train_and_eval():
    torch.manual_seed(1)
    tdisc = torch_discriminator(ndf=16, n_layers=3).train()
    disc, variables = flax_discriminator(tdisc, 16, 3, 64)
    x = _images((3, 64, 64, 3), 2)
    ref = nhwc(tdisc(nchw(x)))  # train mode: batch statistics, running stats updated
    out, upd = disc.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == ref.shape == (3, 6, 6, 1)
    assert rel_err(out, ref) <= TOL
    torch_stats = discriminator_variables_from_torch(state_dict_numpy(tdisc), variables)
    for a, b in zip(jax.tree_util.tree_leaves(upd["batch_stats"]),
                    jax.tree_util.tree_leaves(torch_stats["batch_stats"])):
        assert rel_err(a, b) <= TOL
    tdisc.eval()
    with torch.no_grad():
        ref = nhwc(tdisc(nchw(x)))
    out = disc.apply({**variables, **upd}, x, train=False)
    assert rel_err(out, ref) <= TOL


def test_discriminator_256px_patch_map_and_layout():
    disc = NLayerDiscriminator()
    variables = jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    out = jax.eval_shape(lambda v, x: disc.apply(v, x, mutable=["batch_stats"])[0],
                         variables, jnp.zeros((2, 256, 256, 3)))
    assert out.shape == (2, 30, 30, 1)
    widths = {k: v["kernel"].shape[0] for k, v in variables["params"].items() if "kernel" in v}
    assert widths == {"main_0": 64, "main_2": 128, "main_5": 256, "main_8": 512, "main_11": 1}
    assert [k for k, v in variables["params"].items() if "bias" in v and "kernel" in v] == [
        "main_0", "main_11"]
    assert sorted(variables["batch_stats"]) == ["main_3", "main_6", "main_9"]


# ----------------------------------------------------------------------------- losses


def test_d_losses_and_adopt_weight():
    r = jnp.array([2.0, 0.5, -1.0])
    f = jnp.array([-2.0, 0.0, 1.5])
    assert np.isclose(L.hinge_d_loss(r, f), 1.0)
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    want = 0.5 * (sp(-np.asarray(r)).mean() + sp(np.asarray(f)).mean())
    assert np.isclose(L.vanilla_d_loss(r, f), want, rtol=1e-6)
    assert float(L.adopt_weight(1.0, 10, 11)) == 0.0
    assert float(L.adopt_weight(1.0, 11, 11)) == 1.0
    d = jax.jit(lambda s: L.discriminator_loss(r, f, s, 5, kind="vanilla")[0])
    assert float(d(4)) == 0.0 and np.isclose(float(d(5)), want, rtol=1e-6)
    loss, log = L.discriminator_loss(r, f, 0, 0)
    assert np.isclose(loss, 1.0) and set(log) == {"disc_loss", "logits_real", "logits_fake"}
    assert np.isclose(log["logits_fake"], -1 / 6)
    assert float(L.adaptive_weight(1.0, 0.0, 0.5)) == pytest.approx(0.5 * 1e4)


def test_reconstruction_reductions_and_vq_total():
    x, y = _images((2, 4, 4, 3), 3), _images((2, 4, 4, 3), 4)
    p = np.array([0.5, 1.5], np.float32)
    rec = np.abs(x - y) + p[:, None, None, None]
    nll, terms = L.reconstruction_loss(x, y, p.reshape(2, 1, 1, 1), kind="kl")
    assert np.isclose(nll, rec.sum() / 2, rtol=1e-6)
    nll, terms = L.reconstruction_loss(x, y, p, kind="vq", perceptual_weight=1.0)
    assert np.isclose(nll, rec.mean(), rtol=1e-6) and np.isclose(terms["p_loss"], 1.0)
    loss, log = L.vq_generator_loss(nll, 0.3, 0.2, 2.0, 7, disc_start=7, codebook_weight=1.0,
                                    terms=terms)
    assert np.isclose(loss, rec.mean() + 2.0 * 0.3 + 0.2, rtol=1e-6)
    assert {"total_loss", "nll_loss", "rec_loss", "p_loss", "quant_loss", "d_weight",
            "disc_factor", "g_loss"} <= set(log)
    loss, _ = L.vq_generator_loss(nll, 0.3, 0.2, 2.0, 6, disc_start=7)
    assert np.isclose(loss, rec.mean() + 0.2, rtol=1e-6)


def _perceptual(x0, x1, mean):
    """A cheap stand-in for LPIPS in the generator-step test: per-image (B,1,1,1) distance."""
    return mean((x0 - x1) ** 2 * (1.0 + x0), (1, 2, 3))


def test_kl_generator_step_matches_torch():
    """The module docstring's generator step on a tiny encoder + decoder-like last conv."""
    torch.manual_seed(2)
    enc, last = tnn.Conv2d(3, 8, 3, padding=1), tnn.Conv2d(8, 3, 3, padding=1)
    tdisc = torch_discriminator(ndf=8, n_layers=1).train()
    disc, disc_vars = flax_discriminator(tdisc, 8, 1, 32)
    x = _images((2, 32, 32, 3), 5)
    kl_weight, disc_weight = 1e-2, 0.5

    tx = nchw(x)
    h = torch.tanh(enc(tx))
    rec = last(h)
    p_loss = _perceptual(tx, rec, lambda v, d: v.mean(d, keepdim=True))
    t_nll = torch.sum(torch.abs(tx - rec) + p_loss) / 2
    t_kl = torch.sum(0.5 * h ** 2) / 2
    t_g = -torch.mean(tdisc(rec))
    gn = torch.autograd.grad(t_nll, last.weight, retain_graph=True)[0]
    gg = torch.autograd.grad(t_g, last.weight, retain_graph=True)[0]
    t_dw = torch.clamp(torch.norm(gn) / (torch.norm(gg) + 1e-4), 0.0, 1e4).detach() * disc_weight
    t_loss = t_nll + kl_weight * t_kl + t_dw * 1.0 * t_g
    t_loss.backward()

    sd = {k: v.detach().numpy() for k, v in enc.state_dict().items()}
    params = {"encoder": {"kernel": sd["weight"].transpose(0, 2, 3, 1), "bias": sd["bias"]},
              "decoder": {"conv_out": {"kernel": last.weight.detach().numpy().transpose(0, 2, 3, 1),
                                       "bias": last.bias.detach().numpy()}}}

    def apply_conv(p, v):
        return jax.lax.conv_general_dilated(v, p["kernel"], (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "OHWI", "NHWC")) + p["bias"]

    def generator_loss_fn(ae_params, step):
        def terms(kernel):
            p = L.replace_last_layer(ae_params, kernel)
            hidden = jnp.tanh(apply_conv(p["encoder"], x))
            x_rec = apply_conv(p["decoder"]["conv_out"], hidden)
            p_loss = _perceptual(x, x_rec, lambda v, d: v.mean(d, keepdims=True))
            nll, rec_terms = L.reconstruction_loss(x, x_rec, p_loss, kind="kl")
            logits, state = disc.apply(disc_vars, x_rec, train=True, mutable=["batch_stats"])
            kl = 0.5 * jnp.sum(jnp.square(hidden), axis=(1, 2, 3))
            return (nll, L.gan_generator_loss(logits)), (kl, rec_terms, state)

        (nll, g), d_weight, (kl, rec_terms, state) = L.calculate_adaptive_weight(
            terms, L.get_last_layer(ae_params), disc_weight, has_aux=True)
        loss, log = L.kl_generator_loss(nll, g, kl, d_weight, step, disc_start=3,
                                        kl_weight=kl_weight, terms=rec_terms)
        return loss, (log, state["batch_stats"])

    grads, (log, stats) = jax.jit(jax.grad(generator_loss_fn, has_aux=True))(params, 3)
    assert rel_err(log["d_weight"], t_dw.numpy()) <= TOL
    assert rel_err(log["total_loss"], t_loss.detach().numpy()) <= TOL
    assert rel_err(log["kl_loss"], t_kl.detach().numpy()) <= TOL
    assert float(log["disc_factor"]) == 1.0
    assert {"total_loss", "nll_loss", "rec_loss", "kl_loss", "logvar", "d_weight", "disc_factor",
            "g_loss"} <= set(log)
    assert rel_err(grads["encoder"]["kernel"], enc.weight.grad.numpy().transpose(0, 2, 3, 1)) <= TOL
    assert rel_err(grads["decoder"]["conv_out"]["kernel"],
                   last.weight.grad.numpy().transpose(0, 2, 3, 1)) <= TOL
    want = discriminator_variables_from_torch(state_dict_numpy(tdisc), disc_vars)["batch_stats"]
    assert rel_err(stats["main_3"]["var"], want["main_3"]["var"]) <= TOL
