"""ImageNet as Stable-Diffusion VAE latents (DiT's and the paper's ImageNet-256 setting).

The user provides two paths in params: `data.image_dir`, an ImageFolder root with train/ and val/
(one sub-folder per class, val used as the test split), and `data.vae`, a directory holding the
`stabilityai/sd-vae-ft-ema` weights in diffusers format (config.json + weights).  `bench latents`
encodes every image once (centre crop to data.image_size, as DiT's ADM-style preprocessing, and
its horizontal flip) into `data.latents`; training reads only that file.  The encoder's mean is
used (no sampling) and scaled by 0.18215, the SD VAE's factor, so latents have about unit
variance.  Needs the optional extra: pip install -e '.[vae]' (diffusers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.config import ConfigError
from bench.data.images import DatasetMissing

SCALE = 0.18215
_VAE = {}


def latents_path(d) -> Path:
    return Path(d.latents) if d.latents else Path(d.image_dir or ".") / f"latents-{d.image_size}.pt"


def check_sources(d, need_latents: bool = True) -> None:
    """One line naming every missing user path, before any compute."""
    if need_latents and latents_path(d).is_file():
        return
    missing = []
    if not d.image_dir or not (Path(d.image_dir) / "train").is_dir():
        missing.append(f"ImageNet ImageFolder data.image_dir={d.image_dir or '(unset)'} (needs train/ and val/)")
    if not d.vae or not (Path(d.vae) / "config.json").is_file():
        missing.append(f"VAE weights data.vae={d.vae or '(unset)'} (stabilityai/sd-vae-ft-ema in diffusers format)")
    if missing:
        raise DatasetMissing("missing " + " and ".join(missing) + "; set both paths in the suite's params.yaml")


def load_vae(d, device="cpu"):
    key = (d.vae, str(device))
    if key not in _VAE:
        try:
            from diffusers.models import AutoencoderKL
        except ImportError:
            raise ConfigError("the VAE needs diffusers: pip install -e '.[vae]'") from None
        _VAE[key] = AutoencoderKL.from_pretrained(d.vae).to(device).eval().requires_grad_(False)
    return _VAE[key]


def _folder(d, split: str, size: int):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    root = Path(d.image_dir) / ("train" if split == "train" else "val")
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    return ImageFolder(str(root), transform=tf)


def real_images(d, split: str, n: int = 0) -> torch.Tensor:
    """uint8 (n, 3, S, S) centre crops of the first n images of a split (0: all), for FID."""
    ds = _folder(d, split, d.image_size)
    n = n or len(ds)
    return torch.stack([ds[i][0] for i in range(n)])


@torch.no_grad()
def encode(d, device="cpu", batch_size: int = 64, log=print) -> Path:
    """Encode train and val into data.latents: {split: {"latents": fp16 (N, 2, 4, s, s) [image,
    flipped], "labels": (N,)}}."""
    check_sources(d, need_latents=False)
    out = latents_path(d)
    if out.is_file():
        log(f"latents: {out} already present")
        return out
    from torch.utils.data import DataLoader
    vae = load_vae(d, device)
    result = {}
    for split in ("train", "val"):
        ds = _folder(d, split, d.image_size)
        lat, lab = [], []
        for i, (x, y) in enumerate(DataLoader(ds, batch_size=batch_size, num_workers=4)):
            x = x.to(device).float() / 127.5 - 1
            both = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
            z = vae.encode(both).latent_dist.mean * SCALE
            lat.append(z.view(len(x), 2, *z.shape[1:]).half().cpu())
            lab.append(y)
            if i % 100 == 0:
                log(f"latents: {split} {i * batch_size}/{len(ds)}")
        result[split] = {"latents": torch.cat(lat), "labels": torch.cat(lab)}
    from bench import atomic
    atomic.torch_save(out, {**result, "scale": SCALE, "image_size": d.image_size, "vae": str(d.vae)})
    return out


def load_latents(d, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, labels) of a split; training draws the image or its flip with equal chance
    by using both as examples."""
    blob = torch.load(latents_path(d), map_location="cpu", weights_only=True)
    key = "train" if split == "train" else "val"
    z, y = blob[key]["latents"], blob[key]["labels"]
    return z.flatten(0, 1).float(), y.repeat_interleave(2)


@torch.no_grad()
def decode(d, z: torch.Tensor) -> torch.Tensor:
    """Latents → images in [−1, 1]."""
    vae = load_vae(d, z.device)
    return vae.decode(z / SCALE).sample
