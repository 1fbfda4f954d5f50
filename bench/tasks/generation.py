"""Class-conditional image generation with a DiT denoiser (paper §5.2), scored by FID and KID.

Training (EDM, Karras et al. 2022): y = image in [−1, 1] (or a VAE latent), z = y + σε,
D = c_skip·z + c_out·F_θ(c_in·z; c_noise(σ), class), loss = mean(λ(σ)·‖D − y‖²/dim) through
`bench.diffusion.weighted_loss`.  10 % of labels become the null class (classifier-free
guidance).  Both arms are denoisers (`e2e_denoiser`): e2e trains all layers on σ from the whole
range, dblocks one block on σ from its range; the trainer chooses σ and the layers.

Sampling: z₀ = σ_max·ε, then `eval.steps` network calls along a descending σ grid with Euler
steps (`sample_chain`; the last call returns D at σ_min).  dblocks: the equal-probability grid,
each call run by the block that owns σ; e2e: the Karras ρ = 7 grid through all layers.
Guidance: D = D_null + s·(D_class − D_null) (s = 1 plain conditional, 0 unconditional).

Splits.  Validation is `data.val_fraction` of the train split (seeded by `data.val_seed`, the same
carve as the classification task's); the model trains on the rest.  `evaluate(split=)` scores the
generated images against that split's real images: "val" against the validation images (what
every choice reads, e.g. the σ grid), "test" against the test split (opened through the seal).
The train reference (`fid_splits: [.., train]`, final evaluation only) is the train split *minus*
validation.  Reference features are cached under names that say which set they are
(`fashion_mnist-val0.1-seed0-first1000-…`, `fashion_mnist-test-first1000-…`; a prepared ImageFolder,
`data.dataset: imagefolder` (bench/data/imagefolder.py), is named `imagefolder-<name>-<content hash>-…`).

Metrics (`bench.metrics.fid`, torch-fidelity: its TF-legacy bilinear resize to 299, not clean-fid's):
`val_fid` / `test_fid` with `fid_n` generated images (balanced over classes), the minimum over
`fid_repeats` independent sample sets (EDM's protocol), KID (`val_kid` / `test_kid`) against the
same split, `train_fid` in the final evaluation.  The learning curve uses `curve_fid_n` images.
The val and test evaluations of the same weights share their generated images (memoised by a
checksum of the weights), so scoring both costs one set of samples.  No Inception Score (see
bench/metrics/fid.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.blocks import BlockLayout
from bench.config import ConfigError, DataConfig, EvalConfig, model_config
from bench.data import imagefolder
from bench.diffusion import GRIDS, c_noise, denoised, make_sigmas, sample_chain, scale_input, weighted_loss
from bench.metrics import fid as fidlib
from bench.splits import carve_validation, metric_on
from bench.tasks.base import Task
from bench.tasks.classification import carve_image_validation

IMAGE_DATASETS = ("fashion_mnist", "cifar10", imagefolder.IMAGEFOLDER)
LATENT_DATASETS = ("imagenet_latents",)


@dataclass
class GenerationDataConfig(imagefolder.FolderFields, DataConfig):   # + path, name, resize (imagefolder)
    hflip: bool = False          # random horizontal flips (DiT's only augmentation)
    label_dropout: float = 0.1   # fraction of labels replaced by the null class (CFG training)
    val_fraction: float = 0.1    # validation (the FID reference of every choice) carved from train
    val_seed: int = 0            # ... by this seed, fixed per suite (not the run's seed)
    # imagenet_latents only (see bench/data/latents.py)
    image_dir: str = ""          # ImageFolder root with train/ and val/ (val is the test split)
    vae: str = ""                # directory of the stabilityai/sd-vae-ft-ema weights (diffusers format)
    latents: str = ""            # cached latents written by `bench latents` (default: beside image_dir)
    image_size: int = 256        # pixels; the latent side is image_size / 8


@dataclass
class GenerationEvalConfig(EvalConfig):
    cfg_scale: float = 2.0           # classifier-free guidance s (paper: 2.0); 1: none, 0: unconditional
    steps: int = 50                  # network calls per sample (paper: 50 Euler steps)
    grid_dblocks: str = "equiprobable"   # σ grid of the dblocks sampler (paper App. H)
    grid_e2e: str = "karras"         # σ grid of the e2e sampler (EDM)
    rho: float = 7.0                 # Karras grid exponent
    samples: int = 0                 # images generated per final FID evaluation (0: fid_n)
    fid_n: int = 1000                # images used for the final FID (paper: 50 000)
    fid_repeats: int = 1             # k: the final FID is the minimum over k sample sets (paper: 3)
    curve_fid_n: int = 200           # images per learning-curve FID (cheap, biased upwards)
    fid_ref_n: int = 0               # real images per reference set (0: the whole split)
    # the final FID's references: "test" stands for the evaluated split (validation or test);
    # "train" adds train_fid against the train split minus validation
    fid_splits: list = field(default_factory=lambda: ["test", "train"])
    fid_weights: str = str(fidlib.DEFAULT_WEIGHTS)   # or "download" (torch-fidelity's own, needs a network)
    fid_cache: str = ".cache/fid/stats"
    fid_batch: int = 100             # Inception batch
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    grid_columns: int = 8            # sample grid: one row per class, this many seeds per row
    # the final evaluation also reports the FID under these eval settings, each a comma-separated
    # list of key=value, e.g. "grid_dblocks=karras" (columns val_fid@…, test_fid@…)
    final_variants: list = field(default_factory=list)


VARIANT_KEYS = ("cfg_scale", "steps", "grid_dblocks", "grid_e2e", "rho")


def variant_eval(e: "GenerationEvalConfig", text: str) -> "GenerationEvalConfig":
    """eval settings with a final variant ("grid_dblocks=karras,steps=50") applied."""
    from bench.config import _coerce, parse_settings
    changes = {k: _coerce("eval", k, v, getattr(e, k)) for k, v in parse_settings(text, VARIANT_KEYS).items()}
    return dataclasses.replace(e, **changes)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha1 of the model's tensors: equal weights → equal samples, so val and test share them."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def first_n(*limits: int) -> int:
    """The smallest non-zero limit (0: none): data.val_subset and eval.fid_ref_n together."""
    return min((n for n in limits if n), default=0)


class GenerationTask(Task):
    name = "generation"
    metric = "test_fid"          # val_fid on validation (bench.splits.metric_on)
    higher_is_better = False
    e2e_denoiser = True
    data_config = GenerationDataConfig
    eval_config = GenerationEvalConfig

    @classmethod
    def validate_config(cls, cfg) -> None:
        e, d = cfg.eval, cfg.data
        imagefolder.validate(d)
        if d.normalisation != "train":
            raise ConfigError("data.normalisation is the classification task's (generation scales images to [-1, 1]); "
                              "leave it at train")
        if cfg.model.get("arch") != "dit":
            raise ConfigError(f"task generation needs model.arch: dit, got {cfg.model.get('arch')!r}")
        if d.dataset not in IMAGE_DATASETS + LATENT_DATASETS:
            raise ConfigError(f"unknown data.dataset {d.dataset!r} for generation; "
                              f"choose one of {', '.join(IMAGE_DATASETS + LATENT_DATASETS)}")
        if not 0 < d.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1) for generation (validation FID needs "
                              f"real images), got {d.val_fraction}")
        if e.cfg_scale < 0:
            raise ConfigError(f"eval.cfg_scale must be >= 0, got {e.cfg_scale}")
        if not 0 <= d.label_dropout < 1:
            raise ConfigError(f"data.label_dropout must be in [0, 1), got {d.label_dropout}")
        if e.cfg_scale != 1 and d.label_dropout == 0:
            raise ConfigError("eval.cfg_scale != 1 needs an unconditional model: set data.label_dropout > 0")
        if e.steps < 1:
            raise ConfigError(f"eval.steps must be >= 1, got {e.steps}")
        for key in ("grid_dblocks", "grid_e2e"):
            if getattr(e, key) not in GRIDS:
                raise ConfigError(f"unknown eval.{key} {getattr(e, key)!r}; choose one of {', '.join(GRIDS)}")
        if e.fid_n < 2 or e.curve_fid_n < 2:
            raise ConfigError(f"eval.fid_n and eval.curve_fid_n must be >= 2, got {e.fid_n} and {e.curve_fid_n}")
        if e.fid_n > (e.samples or e.fid_n):
            raise ConfigError(f"eval.fid_n={e.fid_n} is larger than the {e.samples} images generated (eval.samples)")
        if e.fid_repeats < 1:
            raise ConfigError(f"eval.fid_repeats must be >= 1, got {e.fid_repeats}")
        for v in e.final_variants:
            ve = variant_eval(e, v)
            if ve.grid_dblocks not in GRIDS or ve.grid_e2e not in GRIDS or ve.steps < 1 or ve.cfg_scale < 0:
                raise ConfigError(f"eval.final_variants: {v!r} gives an invalid setting")
        bad = [s for s in e.fid_splits if s not in ("train", "test")]
        if bad or not e.fid_splits or "test" not in e.fid_splits:
            raise ConfigError(f"eval.fid_splits must include 'test' (the evaluated split, validation or test) "
                              f"and may add 'train', got {e.fid_splits}")
        if e.fid_ref_n < 0:
            raise ConfigError(f"eval.fid_ref_n must be >= 0, got {e.fid_ref_n}")
        if d.dataset in LATENT_DATASETS and d.image_size % 8:
            raise ConfigError(f"data.image_size {d.image_size} must be divisible by 8 (the VAE's downsampling)")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mcfg = model_config(cfg.model)
        self.train_rows = None   # latents: train example → row of train_x (validation rows left out)
        self._net = None         # Inception, loaded on first use
        self._refs: dict = {}    # "val" | "test" | "train" → (features, Stats)
        self._memo: dict = {}    # one set of weights' generated features and final extras

    # ---- data and model ---------------------------------------------------------------------
    @property
    def latent(self) -> bool:
        return self.cfg.data.dataset in LATENT_DATASETS

    def shape(self) -> tuple[int, int, int]:
        """(channels, side, classes) of what the network denoises (images: after checking they are there)."""
        d = self.cfg.data
        if self.latent:
            from bench.data.latents import store_meta
            meta = store_meta(d) or {}
            return 4, d.image_size // 8, int(meta.get("num_classes", 1000))
        return imagefolder.check_images(self.cfg)

    def check(self) -> None:
        d, e = self.cfg.data, self.cfg.eval
        if self.latent:
            from bench.data.latents import check_sources
            check_sources(d)
        channels, size, classes = self.shape()
        m = self.mcfg
        if (m.in_channels, m.image_size, m.num_classes) != (channels, size, classes):
            label = d.dataset if self.latent else imagefolder.dataset_label(self.cfg)
            raise ConfigError(f"arm {self.cfg.arm}: the model takes {m.in_channels}×{m.image_size}×{m.image_size} inputs "
                              f"and {m.num_classes} classes, but {label} gives {channels}×{size}×{size} and {classes}")
        if e.fid_weights != fidlib.DOWNLOAD:
            try:
                fidlib.check_weights(e.fid_weights)
            except fidlib.WeightsError as err:
                raise ConfigError(str(err)) from None

    def _carve_name(self) -> str:
        d = self.cfg.data
        return f"val{d.val_fraction:g}-seed{d.val_seed}"

    def load(self) -> None:
        """Train (minus validation) for training; validation and the train reference for FID."""
        d, e = self.cfg.data, self.cfg.eval
        carve, val_n = self._carve_name(), first_n(d.val_subset, e.fid_ref_n)
        if self.latent:
            val_size, train_size = self._load_latents(carve, val_n)
        else:
            full, name = imagefolder.load_images(self.cfg, "train"), imagefolder.dataset_label(self.cfg)
            # the carve of the whole train split; train_subset limits training, not the train reference
            train, val = carve_image_validation(dataclasses.replace(d, train_subset=0), full)
            train_set = train.head(d.train_subset)
            self.train_x, self.train_y = train_set.images, train_set.labels
            self.val_data = fidlib.ReferenceSet(f"{name}-{carve}-first{val_n or 'all'}",
                                                lambda: val.head(val_n).images)
            self.train_reference = fidlib.ReferenceSet(f"{name}-train-minus-{carve}-first{e.fid_ref_n or 'all'}",
                                                       lambda: train.head(e.fid_ref_n).images)
            val_size, train_size = len(val), len(train)
        self.num_train = len(self.train_rows) if self.train_rows is not None else len(self.train_y)
        for name, size, wanted in (("validation", val_size, True), ("train", train_size, "train" in e.fid_splits)):
            if wanted and e.fid_ref_n > size:
                raise ConfigError(f"eval.fid_ref_n={e.fid_ref_n} is larger than the {name} reference ({size} images)")
            if wanted and size < 2:
                raise ConfigError(f"the {name} split has {size} images; FID needs at least 2 (data.val_fraction)")

    def _load_latents(self, carve: str, val_n: int) -> tuple[int, int]:
        """The store's train latents stay on disk (a memmap); train_rows are the images left for
        training after the validation carve.  The FID references stream from the ImageFolder."""
        from bench.data.latents import FolderImages, load_latents
        d, e = self.cfg.data, self.cfg.eval
        self.train_x, self.train_y = load_latents(d, "train")
        train_idx, val_idx = carve_validation(len(self.train_y), d.val_fraction, d.val_seed)
        self.train_rows = torch.from_numpy(train_idx[:d.train_subset or None])
        val_idx, ref_idx = val_idx[:val_n or None], train_idx[:e.fid_ref_n or None]
        self.val_data = fidlib.ReferenceSet(f"{d.dataset}{d.image_size}-{carve}-first{val_n or 'all'}",
                                            lambda: FolderImages(d, "train", val_idx))
        self.train_reference = fidlib.ReferenceSet(
            f"{d.dataset}{d.image_size}-train-minus-{carve}-first{e.fid_ref_n or 'all'}",
            lambda: FolderImages(d, "train", ref_idx))
        return len(val_idx), len(train_idx)

    def load_test(self) -> fidlib.ReferenceSet:
        """The test split's real images (first test_subset / fid_ref_n), read when first needed."""
        d, e = self.cfg.data, self.cfg.eval
        n = first_n(d.test_subset, e.fid_ref_n)
        if self.latent:
            from bench.data.latents import real_images
            return fidlib.ReferenceSet(f"{d.dataset}{d.image_size}-test-first{n or 'all'}", lambda: real_images(d, "val", n))
        test = imagefolder.load_images(self.cfg, "test")
        if e.fid_ref_n > len(test):
            raise ConfigError(f"eval.fid_ref_n={e.fid_ref_n} is larger than the test split ({len(test)} images)")
        return fidlib.ReferenceSet(f"{imagefolder.dataset_label(self.cfg)}-test-first{n or 'all'}",
                                   lambda: test.head(n).images)

    def build_model(self):
        from bench.models import ARCHS
        return ARCHS["dit"][1](self.mcfg)

    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images → [−1, 1]; latents are already scaled."""
        return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()

    def batch(self, indices, seed, device):
        rows = indices if self.train_rows is None else self.train_rows[indices]
        # flips: an augmentation drawn per step and example (the latent store holds each flip's latent)
        flip = (torch.rand(len(rows), generator=torch.Generator().manual_seed(seed)) < 0.5) if self.cfg.data.hflip \
            else None
        if self.latent:
            from bench.data.latents import latent_rows
            x = latent_rows(self.train_x, rows.numpy(), None if flip is None else flip.numpy())
            return x.to(device), torch.from_numpy(self.train_y[rows.numpy()]).to(device)
        x = self.to_model_space(self.train_x[rows])
        if flip is not None:
            x[flip] = x[flip].flip(-1)
        return x.to(device), self.train_y[rows].to(device)

    def example_batch(self, batch_size, device):
        m = self.mcfg
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, m.in_channels, m.image_size, m.image_size, generator=g)
        return x.to(device), torch.randint(m.num_classes, (batch_size,), generator=g).to(device)

    # ---- training ---------------------------------------------------------------------------
    def denoise(self, model, z, sigma, labels, layers: range) -> torch.Tensor:
        """D_θ(z; σ, class) = c_skip·z + c_out·F_θ(c_in·z; c_noise, class) through `layers`."""
        sd = self.noise.sigma_data
        F_out = model(scale_input(z, sigma, sd), c_noise(sigma), labels, layers)
        return denoised(z, F_out, sigma, sd)

    def loss(self, model, batch, *, sigma, layers, generator=None):
        y, labels = batch
        sigma = sigma.to(y.device, torch.float32)
        eps = self.shard.draw(torch.randn, y.shape, generator).to(y.device)   # CPU generator: same on any device
        drop = self.shard.draw(torch.rand, (len(labels),), generator).to(y.device) < self.cfg.data.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.mcfg.num_classes), labels)
        D = self.denoise(model, y + sigma.view(-1, 1, 1, 1) * eps, sigma, labels, layers)
        l2 = ((D - y) ** 2).flatten(1).mean(1)
        loss = weighted_loss(l2, sigma, self.noise.sigma_data, self.cfg.diffusion.weighting)
        return loss, {"ce": l2.mean().detach()}    # "ce": the trainer's name for the unweighted loss

    # ---- sampling ---------------------------------------------------------------------------
    def sampler_plan(self, steps: int | None = None):
        """(σ grid ending in 0, partition, layout) of this arm's sampler."""
        e = self.cfg.eval
        steps = steps or e.steps
        if self.cfg.is_dblocks:
            partition, layout, grid = self.partition, self.layout, e.grid_dblocks
        else:
            partition, layout, grid = self.full_range, BlockLayout((self.layout.depth,)), e.grid_e2e
        sigmas = torch.cat([make_sigmas(self.noise, steps, grid, e.rho), torch.zeros(1, dtype=torch.float64)])
        return sigmas, partition, layout

    def layer_evals_per_sample(self, steps: int | None = None) -> int:
        """Transformer-layer forward passes per generated image (×2 with guidance)."""
        sigmas, partition, layout = self.sampler_plan(steps)
        per = sum(len(layout.layers_of(partition.block_of(s))) for s in sigmas[:-1].tolist())
        return per * (1 if self.cfg.eval.cfg_scale == 1 else 2)

    @torch.no_grad()
    def sample(self, model, labels: torch.Tensor, generator: torch.Generator, steps: int | None = None,
               cfg_scale: float | None = None, step_hook=None) -> torch.Tensor:
        """Images (model space) for these labels; ε drawn from `generator` (CPU)."""
        sigmas, partition, layout = self.sampler_plan(steps)
        s = self.cfg.eval.cfg_scale if cfg_scale is None else cfg_scale
        n, device = len(labels), labels.device
        null = torch.full_like(labels, self.mcfg.num_classes)

        def denoise(z, sigma: float, block: int) -> torch.Tensor:
            layers = layout.layers_of(block)
            if s == 1:
                D = self.denoise(model, z, torch.full((n,), sigma, device=device), labels, layers)
            else:   # conditional and unconditional in one batch
                Dc, Du = self.denoise(model, torch.cat([z, z]), torch.full((2 * n,), sigma, device=device),
                                      torch.cat([labels, null]), layers).chunk(2)
                D = Du + s * (Dc - Du)
            if step_hook:
                step_hook()
            return D

        m = self.mcfg
        eps = torch.randn((n, m.in_channels, m.image_size, m.image_size), generator=generator).to(device)
        return sample_chain(denoise, self.noise.sigma_max * eps, sigmas, partition)

    def generate(self, model, n: int, seed: int, device, steps: int | None = None) -> torch.Tensor:
        """n images as uint8 RGB (classes balanced: label i % classes), in batches of eval.batch_size."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % self.mcfg.num_classes
        out = []
        for i in range(0, n, self.cfg.eval.batch_size):
            x = self.sample(model, labels[i:i + self.cfg.eval.batch_size].to(device), g, steps)
            out.append(self.to_pixels(x).cpu())
        return torch.cat(out)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples → uint8 RGB images (latents through the VAE decoder)."""
        if self.latent:
            from bench.data.latents import decode
            x = decode(self.cfg.data, x)
        return fidlib.to_uint8_rgb(x)

    # ---- FID --------------------------------------------------------------------------------
    def inception(self, device):
        if self._net is None:
            self._net = fidlib.inception(self.cfg.eval.fid_weights, device)
        return self._net

    def reference(self, split: str, device) -> tuple[torch.Tensor, fidlib.Stats]:
        """Features and statistics of the real images of "val", "test" (through the seal) or
        "train" (minus validation), cached on disk under the set's own name."""
        ref = self.train_reference if split == "train" else self.split_data(split)   # test: via the seal
        if split not in self._refs:
            e = self.cfg.eval
            weights = "tf-download" if e.fid_weights == fidlib.DOWNLOAD else fidlib.CONVERTED_SHA256[:12]
            feats = fidlib.cached_features(Path(e.fid_cache), f"{ref.name}-{weights}", ref.read,
                                           self.inception(device), e.fid_batch)
            self._refs[split] = feats, fidlib.statistics(feats)
        return self._refs[split]

    def _memo_for(self, model) -> dict:
        """What is kept for these weights (dropped when the weights change)."""
        fingerprint = weights_fingerprint(model)
        if self._memo.get("weights") != fingerprint:
            self._memo = {"weights": fingerprint, "generated": {}, "extras": None}
        return self._memo

    def generated(self, model, device, n: int, seed: int, memo: dict) -> tuple[torch.Tensor, fidlib.Stats]:
        """Inception features (float32, what the network gives) and statistics of n generated
        images under the current eval settings, memoised for these weights (`_memo_for`)."""
        key = (repr(self.cfg.eval), n, seed, str(device))
        cache = memo["generated"]
        if key not in cache:
            images = self.generate(model, n, seed=seed, device=device)
            feats = fidlib.features(self.inception(device), images, self.cfg.eval.fid_batch).float()
            cache[key] = feats, fidlib.statistics(feats)
        return cache[key]

    def fid_scores(self, model, device, n: int, repeats: int, split: str) -> dict:
        """FID against `split`'s reference (minimum over `repeats` sample sets) and the KID of
        the sample set that gave it; keys named for the split (test_fid / val_fid, train_fid)."""
        e = self.cfg.eval
        ref_feats, ref_stats = self.reference(split, device)
        best, kid, memo = math.inf, None, self._memo_for(model)
        for r in range(repeats):
            feats, stats = self.generated(model, device, n, e.seed + 7919 * r, memo)
            value = fidlib.fid(stats, ref_stats)
            if value <= best:
                best = value
                if split != "train":
                    kid = fidlib.kid(feats, ref_feats, e.kid_subset_size, e.kid_subsets, seed=e.seed)
        if split == "train":
            return {"train_fid": best}
        kid_key = metric_on("test_kid", split)
        return {metric_on("test_fid", split): best, kid_key: kid[0], f"{kid_key}_std": kid[1]}

    @torch.no_grad()
    def evaluate(self, model, device, final: bool = False, split: str = "val") -> dict:
        """Curve point: FID@curve_fid_n against `split`.  Final: FID@fid_n (min over fid_repeats)
        and KID against `split`, the FID of each eval.final_variants setting (`val_fid@…`: what
        the grid choice reads), and, shared by both splits, train_fid, sampling cost and a PNG."""
        e = self.cfg.eval
        self.reference(split, device)    # a sealed test split fails here, before any sampling
        was_training = model.training
        model.eval()
        try:
            if not final:
                return {**self.fid_scores(model, device, e.curve_fid_n, 1, split), "fid_n": e.curve_fid_n}
            result = {**self.fid_scores(model, device, e.fid_n, e.fid_repeats, split), **self.final_extras(model, device)}
            base = self.cfg.eval
            unused = "grid_e2e" if self.cfg.is_dblocks else "grid_dblocks"  # the other arm's sampler grid
            for text in e.final_variants:   # the same weights, another sampler setting
                changed = {k for k in VARIANT_KEYS if getattr(variant_eval(base, text), k) != getattr(base, k)}
                if not changed - {unused}:
                    continue
                self.cfg.eval = variant_eval(base, text)
                try:
                    fid_key = metric_on("test_fid", split)
                    result[f"{fid_key}@{text}"] = self.fid_scores(model, device, e.fid_n, e.fid_repeats, split)[fid_key]
                finally:
                    self.cfg.eval = base
            return result
        finally:
            model.train(was_training)

    def final_extras(self, model, device) -> dict:
        """The final evaluation's figures that belong to no split, computed once per weights."""
        memo = self._memo_for(model)
        if memo["extras"] is None:
            e = self.cfg.eval
            extras = {"fid_n": e.fid_n, "fid_repeats": e.fid_repeats, "fid_ref_n": e.fid_ref_n,
                      "fid_resize": fidlib.RESIZE, "steps": e.steps, "cfg_scale": e.cfg_scale,
                      "layer_evals_per_image": self.layer_evals_per_sample()}
            if "train" in e.fid_splits:
                extras.update(self.fid_scores(model, device, e.fid_n, e.fid_repeats, "train"))
            extras.update(self.sampling_cost(model, device))
            extras["samples_png"] = str(self.save_grid(model, device, Path(self.cfg.out_dir) / "samples.png"))
            memo["extras"] = extras
        return dict(memo["extras"])

    # ---- pictures and cost ------------------------------------------------------------------
    def grid_images(self, model, device) -> torch.Tensor:
        """One row per class, eval.grid_columns fixed seeds per row: uint8 (rows·cols, 3, H, W)."""
        k, cols = self.mcfg.num_classes, self.cfg.eval.grid_columns
        rows = min(k, 10 if self.latent else k)      # ImageNet: the first 10 classes
        labels = torch.arange(rows).repeat_interleave(cols).to(device)
        return self.to_pixels(self.sample(model, labels, torch.Generator().manual_seed(self.cfg.eval.seed))).cpu()

    def save_grid(self, model, device, path: Path) -> Path:
        """The grid as a figure a reader can read: the arm in the title, the class on each row."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchvision.utils import make_grid

        from bench import atomic
        cols = self.cfg.eval.grid_columns
        images = self.grid_images(model, device)
        grid = make_grid(images.float() / 255, nrow=cols, padding=1, pad_value=1.0).permute(1, 2, 0).numpy()
        rows = len(images) // cols
        names = imagefolder.class_names(self.cfg)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * cols + 1.8), max(4.0, 0.6 * rows + 0.8)))
        ax.imshow(grid, interpolation="nearest")
        side = (grid.shape[0] - 1) / rows
        ax.set_yticks([side * (r + 0.5) for r in range(rows)],
                      [names[r] if r < len(names) else f"class {r}" for r in range(rows)], fontsize=8)
        ax.set_xticks([])
        ax.set_title(f"{self.cfg.suite} / {self.cfg.arm}: one row per class, {cols} fixed seeds "
                     f"(eval.seed {self.cfg.eval.seed})", fontsize=9)
        fig.tight_layout()
        atomic.save_figure(path, fig, dpi=120)
        return path

    def sampling_cost(self, model, device, batch: int = 50, repeats: int = 3) -> dict:
        """Median seconds per network call (one Euler step, with guidance) for a batch, and per image
        for the whole `eval.steps` chain."""
        labels = torch.arange(batch).to(device) % self.mcfg.num_classes
        times, per_call = [], []

        def tick():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter())

        for _ in range(repeats):
            times.clear()
            tick()
            self.sample(model, labels, torch.Generator().manual_seed(0), step_hook=tick)
            per_call += [b - a for a, b in zip(times, times[1:])]
        per_step = statistics.median(per_call)
        return {"sec_per_step": per_step, "sec_per_image": per_step * self.cfg.eval.steps / batch}
