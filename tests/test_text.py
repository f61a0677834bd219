"""Conditioning encoders against their PyTorch references: LDMBert, the BERT tokenizer, class and
spatial conditioners."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from latentdiff.convert.torch_names import convert_state_dict
from latentdiff.models.conditioning import ClassEmbedder, SpatialRescaler
from latentdiff.models.text import LDMBert, TextEncoderConfig
from latentdiff.models.tokenizer import BertTokenizer
from tests.torch_utils import flax_params_from_torch, nchw, nhwc, rel_err

# ---------------------------------------------------------------- LDMBert


@pytest.fixture(scope="module")
def bert_pair():
    """diffusers' LDMBertModel (small, random, eval) and our module with its converted weights."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (LDMBertConfig,
                                                                                 LDMBertModel)

    torch.manual_seed(0)
    tcfg = LDMBertConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, head_dim=16,
                         encoder_ffn_dim=64, vocab_size=100, max_position_embeddings=77)
    tmodel = LDMBertModel(tcfg).eval()
    with torch.no_grad():  # non-trivial norms too
        for name, p in tmodel.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = TextEncoderConfig.from_diffusers(tcfg.to_dict())
    ids = np.random.default_rng(0).integers(1, 100, (2, 77)).astype(np.int32)
    ids[0, 20:] = 0  # padding, attended to as in the paper
    model = LDMBert(cfg)
    params = flax_params_from_torch(tmodel, model, ids, ignore=("to_logits",))
    return tmodel, model, params, ids


def test_ldmbert_matches_diffusers(bert_pair):
    tmodel, model, params, ids = bert_pair
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    out = jax.jit(model.apply)({"params": params}, ids)
    assert out.shape == (2, 77, 32)
    err = rel_err(out, ref)
    print(f"LDMBert vs diffusers rel err {err:.2e}")
    assert err <= 1e-4


def test_ldmbert_param_names(bert_pair):
    _, _, params, _ = bert_pair
    layer = params["model"]["layers_0"]
    assert set(layer) == {"self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"}
    assert set(layer["self_attn"]["q_proj"]) == {"kernel"}  # no bias
    assert set(layer["self_attn"]["out_proj"]) == {"kernel", "bias"}
    assert set(params["model"]) == {"embed_tokens", "embed_positions", "layers_0", "layers_1",
                                    "layer_norm"}


def test_ldmbert_bf16_close_to_fp32(bert_pair):
    _, model, params, ids = bert_pair
    ref = jax.jit(model.apply)({"params": params}, ids)
    out = jax.jit(LDMBert(model.config, dtype=jnp.bfloat16).apply)({"params": params}, ids)
    assert out.dtype == jnp.bfloat16
    err = rel_err(np.asarray(out, np.float32), ref)
    print(f"LDMBert bf16 vs fp32 rel err {err:.2e}")
    assert err <= 2e-2



def test_ldmbert_remat_same_values_fewer_residuals(bert_pair):
    """Checkpointed layers (`use_checkpoint`, as the 1.45B config trains) give the same outputs and
    gradients while the backward pass keeps far fewer activations."""
    import dataclasses

    from jax._src.ad_checkpoint import saved_residuals

    _, model, params, ids = bert_pair
    remat = LDMBert(dataclasses.replace(model.config, remat=True))
    assert TextEncoderConfig.from_compvis(dict(n_embed=32, n_layer=2, use_checkpoint=True)).remat

    def loss(m):
        return lambda p: jnp.sum(m.apply({"params": p}, ids) ** 2)

    ref, out = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (model, remat))
    assert abs(float(out[0]) - float(ref[0])) <= 1e-6 * abs(float(ref[0]))
    for a, b in zip(jax.tree_util.tree_leaves(out[1]), jax.tree_util.tree_leaves(ref[1])):
        assert rel_err(a, b) <= 1e-5  # the same arithmetic, fused differently

    def activation_bytes(m):  # what the backward pass saves besides the parameters themselves
        return sum(a.size * a.dtype.itemsize for a, why in saved_residuals(loss(m), params)
                   if "from the argument" not in why)

    assert activation_bytes(remat) < 0.5 * activation_bytes(model)

def test_text_encoder_configs():
    assert TextEncoderConfig.from_diffusers({}) == TextEncoderConfig()  # LDMBertConfig defaults
    cfg = TextEncoderConfig.from_compvis({"n_embed": 640, "n_layer": 32})
    assert (cfg.width, cfg.depth, cfg.heads, cfg.head_dim, cfg.ffn_dim) == (640, 32, 8, 64, 2560)
    assert (cfg.vocab_size, cfg.max_length) == (30522, 77)
    with pytest.raises(ValueError, match="gelu"):
        TextEncoderConfig.from_diffusers({"activation_function": "relu"})


# ---------------------------------------------------------------- tokenizer

_WORDS = ("the cat dog an painting of squirrel eat ##ing burger hello world it toy cafe creme brulee "
          "naive resume upper case mixed un ##aff ##able multiple spaces and new ##lines token photo "
          "red blue green house tree on in with by ##ed ##er oil canvas portrait landscape mountain "
          "river sunset city street night light dark sky cloud ##y ##ly high quality digital art "
          "style by van go ##gh monet render ##ing octane unreal engine 4 ##k detailed beautiful "
          "woman man child old young small big white black yellow orange purple pink "
          "中 文 数 字").split()
_LETTERS = [c for c in "abcdefghiklmnoprstuvwy"]  # no j, q, x, z: words with them are [UNK]
_PUNCT = list(".,!?'\"-():;/&[]—…#*")  # no '@'
_VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + _LETTERS
                             + ["##" + c for c in _LETTERS] + list("0123456789") + _PUNCT))

_TEXTS = [
    "A painting of a squirrel eating a burger",
    "Hello, World! It's a cat's toy... (really?)",
    "Café crème brûlée — naïve résumé",
    "UPPER case MiXeD CaSe",
    "a xylophone and a zebra quiz",
    "unaffable unable affable",
    "  multiple   spaces\tand\nnewlines  ",
    "a [MASK] token [CLS] [mask]",
    "数字 and 中文字",
    "",
    "control\x00chars\x07here\u200b and\u00a0nbsp",
    "email@example.com #1 * 2",
    "a" * 101 + " " + "b" * 100,
    "Oil painting of a mountain river at sunset, by Van Gogh; highly detailed, 4k, unreal engine",
    "the cat " * 50,
]


def _encode_quietly(tok, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some texts are truncated
        return tok.encode(texts, max_length=77)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_vocab")
    (path / "vocab.txt").write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
    return path


def test_tokenizer_matches_transformers(vocab_dir):
    import transformers

    # transformers 5 ignores `BertTokenizer(vocab_file=...)` (it builds a 5-token default vocab),
    # so load the folder, and check that it did read our vocabulary.
    ref_tok = transformers.BertTokenizer.from_pretrained(str(vocab_dir))
    assert len(ref_tok) == len(_VOCAB)
    ref = ref_tok(_TEXTS, padding="max_length", truncation=True, max_length=77)["input_ids"]
    tok = BertTokenizer.from_pretrained(str(vocab_dir))
    ids = _encode_quietly(tok, _TEXTS)
    assert ids.dtype == np.int32 and ids.shape == (len(_TEXTS), 77)
    for text, r, g in zip(_TEXTS, ref, ids):
        assert list(g) == list(r), text
    assert ids[-1, -1] == tok.sep_id and ids[0, -1] == tok.pad_id == 0


def test_tokenizer_reads_transformers5_folder(vocab_dir, tmp_path):
    """transformers 5 saves only tokenizer.json (no vocab.txt); that folder must load too."""
    import transformers

    transformers.BertTokenizer.from_pretrained(str(vocab_dir)).save_pretrained(str(tmp_path / "tok"))
    tok = BertTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.vocab_file.endswith("tokenizer.json")
    ref = BertTokenizer.from_pretrained(str(vocab_dir))
    np.testing.assert_array_equal(_encode_quietly(tok, _TEXTS), _encode_quietly(ref, _TEXTS))
    tok.save_vocab(str(tmp_path / "vocab.txt"))
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8") == (vocab_dir / "vocab.txt").read_text(
        encoding="utf-8")


def test_tokenizer_truncation_warns(vocab_dir):
    tok = BertTokenizer(str(vocab_dir / "vocab.txt"))
    with pytest.warns(UserWarning, match=r"prompt 1 .* dropping its last 25 tokens"):
        ids = tok.encode(["a cat", "the cat " * 50], max_length=77)  # 100 tokens + 2 special
    assert ids[1, 0] == tok.cls_id and ids[1, -1] == tok.sep_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(["the cat " * 37 + "a"])  # 75 tokens: fits exactly


def test_tokenizer_unknown_words_and_errors(vocab_dir, tmp_path):
    tok = BertTokenizer.from_pretrained(str(vocab_dir))
    unknown = tok.unknown_words("A Xylophone, a zebra and a xylophone; unaffable!")
    assert unknown == ["xylophone", "zebra"]
    assert tok.unknown_words("the painting@home") == ["@"]
    assert tok.unknown_words("the cat") == []
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        BertTokenizer.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------- class / spatial conditioning


def test_class_embedder():
    table = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    model = ClassEmbedder(n_classes=10, embed_dim=8)
    labels = np.array([3, 0, 9], np.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), labels))["params"]
    params = convert_state_dict({"embedding.weight": table}, shapes)
    out = model.apply({"params": params}, labels)
    assert out.shape == (3, 1, 8)
    np.testing.assert_array_equal(np.asarray(out)[:, 0], table[labels])


class _TorchRescaler(torch.nn.Module):
    """CompVis' SpatialRescaler, written out for the test."""

    def __init__(self, n_stages, method, multiplier, cin, cout, bias):
        super().__init__()
        self.n_stages, self.method, self.multiplier = n_stages, method, multiplier
        self.channel_mapper = torch.nn.Conv2d(cin, cout, 1, bias=bias) if cout else None

    def forward(self, x):
        for _ in range(self.n_stages):
            x = torch.nn.functional.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.channel_mapper is not None else x


@pytest.mark.parametrize("method,n_stages,multiplier,cout,bias", [
    ("bilinear", 2, 0.5, 3, False),
    ("bilinear", 1, 0.75, None, False),
    ("nearest", 2, 0.5, 4, True),
    ("bicubic", 1, 0.5, 3, False),
    ("area", 1, 0.25, 3, False),
])
def test_spatial_rescaler(method, n_stages, multiplier, cout, bias):
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 20, 18, 5)).astype(np.float32)
    tmod = _TorchRescaler(n_stages, method, multiplier, 5, cout, bias)
    model = SpatialRescaler(n_stages, method, multiplier, in_channels=5, out_channels=cout, bias=bias)
    variables = {"params": flax_params_from_torch(tmod, model, x)} if cout else {}
    out = model.apply(variables, x)
    with torch.no_grad():
        ref = nhwc(tmod(nchw(x)))
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5
