"""One-time conversion of LPIPS' two PyTorch downloads into the single file `LPIPS` loads.

    python -m latentdiff.convert.lpips_weights --vgg vgg16-397923af.pth --lin vgg.pth \
        --out lpips_vgg16.safetensors

Inputs: torchvision's VGG16 state dict (`features.N.weight|bias`; `classifier.*` is dropped) and
the LPIPS heads (`lin0.model.1.weight` .. `lin4.model.1.weight`, each (1, C, 1, 1)). The output
keeps PyTorch layout under the names `features.N.*` and `lin.I.weight` and is checked against the
model before it is written. Needs torch to read the pickles.
"""
import argparse
import hashlib
import re

import numpy as np

LIN_MD5 = "d507d7349b931f0638a25a48a722f98a"
_LIN_KEY = re.compile(r"^(?:module\.)?lin(\d)\.model\.\d+\.weight$")


def merge_lpips_state_dicts(vgg_sd, lin_sd):
    """torchvision VGG16 + LPIPS heads state dicts -> {features.N.*, lin.I.weight}."""
    from latentdiff.losses.lpips import vgg16_conv_indices

    convs = {n for block in vgg16_conv_indices() for n in block}
    out = {k: v for k, v in vgg_sd.items()
           if k.startswith("features.") and int(k.split(".")[1]) in convs}
    for key, value in lin_sd.items():
        m = _LIN_KEY.match(key)
        if m:
            out[f"lin.{m.group(1)}.weight"] = value
    return out


def convert_lpips_weights(vgg_path, lin_path, out_path):
    """Read both downloads, check them against `LPIPS`, write `out_path` (safetensors)."""
    from safetensors.numpy import save_file

    from latentdiff.convert.torch_names import load_state_dict
    from latentdiff.losses.lpips import lpips_params_from_state_dict

    merged = merge_lpips_state_dicts(load_state_dict(vgg_path), load_state_dict(lin_path))
    lpips_params_from_state_dict(merged)  # raises, naming the first missing/mis-shaped tensor
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sorted(merged.items())},
              out_path)
    return out_path


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    parser.add_argument("--lin", required=True, help="LPIPS heads vgg.pth (lpips / taming)")
    parser.add_argument("--out", default="lpips_vgg16.safetensors")
    args = parser.parse_args(argv)
    if _md5(args.lin) != LIN_MD5:
        print(f"note: {args.lin} is not the released vgg.pth (MD5 {LIN_MD5}); converting anyway")
    print(f"wrote {convert_lpips_weights(args.vgg, args.lin, args.out)}")


if __name__ == "__main__":
    main()
