"""Image classification as denoising of a label embedding (paper §5.1, official ViT code).

Target y = L2-normalised learned label embedding; z_σ = y + σε takes the [CLS] slot (scaled by
c_in); D = c_skip·z_σ + c_out·F; logits = head(D).  The loss is cross-entropy, weighted by

  lambda    per-sample λ(σ)·CE, averaged over the batch (the paper's Eq. 6)
  official  mean(CE)·mean(λ): what the official code computes, through an (N,)×(N,1)
            broadcast; every sample in the batch gets the same weight
  uniform   plain mean(CE)

Inference chains the blocks: z from σ_max·ε, Euler steps on an equal-probability σ grid, each
step run by the block owning σ, with D = softmax(logits) @ normalised label embeddings; the
logits of a final call at the last σ are the prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass, field
from functools import cached_property

from bench.blocks import BlockLayout
from bench.config import ConfigError, DataConfig, EvalConfig, model_config, parse_settings
from bench.data import imagefolder
from bench.data.images import AUGMENTATIONS, ImageSplit, augment, normalise
from bench.diffusion import (Partition, c_noise, denoised, sample_chain, scale_input, sigmas_equiprobable,
                             weighted_loss)
from bench.splits import carve_validation
from bench.tasks.base import Task

@dataclass
class ImageDataConfig(imagefolder.FolderFields, DataConfig):   # + path, name, resize (data.dataset: imagefolder)
    augment: str = "none"              # none | crop_flip | randaugment (crop_flip + RandAugment) | resized_crop_flip
    val_fraction: float = 0.1          # validation carved from train (seeded by val_seed, fixed per suite)
    val_seed: int = 0


@dataclass
class ClassificationEvalConfig(EvalConfig):
    noise_draws: int = 1               # inference noises averaged per test image (official: 1)
    # bench: D = softmax(logits) @ normalised label table, chain from σ_max·ε (the paper's text);
    # official: the raw (unnormalised) label table and the chain from √(1+σ_max²)·ε (the official code)
    inference: str = "bench"
    # the final evaluation (`bench evaluate`) also reports these inference settings, each a
    # comma-separated list of steps=N|B+1, draws=N, sigma_start=X; e.g. "draws=8,sigma_start=10"
    final_variants: list = field(default_factory=lambda: ["steps=B+1", "draws=8"])


VARIANT_KEYS = ("steps", "draws", "sigma_start", "inference")
INFERENCE = ("bench", "official")


def parse_variant(text: str, num_blocks: int) -> dict:
    """'steps=B+1,draws=8' → {'steps': B+1, 'draws': 8}."""
    raw = parse_settings(text, VARIANT_KEYS)
    convert = {"steps": lambda v: num_blocks + 1 if v.replace(" ", "") == "B+1" else int(v), "draws": int,
               "sigma_start": float, "inference": inference_kind}
    try:
        return {k: convert[k](v) for k, v in raw.items()}
    except ValueError:
        raise ConfigError(f"eval.final_variants: cannot read {text!r}; steps=N|B+1, draws=N, sigma_start=X, "
                          f"inference={'|'.join(INFERENCE)}") from None


def inference_kind(text: str) -> str:
    if text not in INFERENCE:
        raise ValueError(text)
    return text


def carve_image_validation(data, train: ImageSplit) -> tuple[ImageSplit, ImageSplit]:
    """(train, validation) from the full train split: data.val_fraction of it, seeded by
    data.val_seed; then data.train_subset / data.val_subset keep the first N of each."""
    train_idx, val_idx = carve_validation(len(train), data.val_fraction, data.val_seed)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return (ImageSplit(train.images[train_idx], train.labels[train_idx]).head(data.train_subset),
            ImageSplit(train.images[val_idx], train.labels[val_idx]).head(data.val_subset))


class ClassificationTask(Task):
    name = "classification"
    metric = "test_acc"
    higher_is_better = True
    e2e_denoiser = False
    data_config = ImageDataConfig
    eval_config = ClassificationEvalConfig

    @classmethod
    def validate_config(cls, cfg) -> None:
        imagefolder.validate(cfg.data)
        if cfg.data.augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown data.augment {cfg.data.augment!r}; choose {', '.join(AUGMENTATIONS)}")
        if cfg.eval.inference not in INFERENCE:
            raise ConfigError(f"unknown eval.inference {cfg.eval.inference!r}; choose {' or '.join(INFERENCE)}")
        if cfg.eval.noise_draws < 1:
            raise ConfigError(f"eval.noise_draws must be >= 1, got {cfg.eval.noise_draws}")
        for v in cfg.eval.final_variants:
            parse_variant(v, cfg.diffusion.num_blocks)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.weighting = cfg.diffusion.weighting

    # ---- data and model ---------------------------------------------------------------------
    def check(self) -> None:
        channels, size, classes = imagefolder.check_images(self.cfg)
        m = model_config(self.cfg.model)
        if (m.in_channels, m.image_size, m.num_classes) != (channels, size, classes):
            raise ConfigError(f"arm {self.cfg.arm}: the model takes {m.in_channels}×{m.image_size}×{m.image_size} images "
                              f"and {m.num_classes} classes, but {imagefolder.dataset_label(self.cfg)} has "
                              f"{channels}×{size}×{size} and {classes}")

    def load(self) -> None:
        self.train_split, self.val_data = carve_image_validation(self.cfg.data, imagefolder.load_images(self.cfg, "train"))
        self.num_train = len(self.train_split)

    def load_test(self) -> ImageSplit:
        return imagefolder.load_images(self.cfg, "test").head(self.cfg.data.test_subset)

    def build_model(self):
        from bench.models import ARCHS
        _, model_cls = ARCHS[self.cfg.model["arch"]]
        return model_cls(model_config(self.cfg.model), conditioned=self.conditioned)

    def batch(self, indices, seed, device):
        return self._images(self.train_split, indices, device, self.cfg.data.augment, seed)

    def example_batch(self, batch_size, device):
        m = model_config(self.cfg.model)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, m.in_channels, m.image_size, m.image_size, generator=g)
        return images.to(device), torch.randint(m.num_classes, (batch_size,), generator=g).to(device)

    def _images(self, split, indices, device, augmentation="none", seed=0):
        images = augment(split.images[indices], augmentation, seed)
        return normalise(images, self.cfg.data.dataset, self.normalisation).to(device), split.labels[indices].to(device)

    @cached_property
    def normalisation(self) -> tuple | None:
        """A prepared ImageFolder's recorded train mean/std (None: the built-in dataset's table)."""
        return imagefolder.normalisation(self.cfg)

    # ---- training ---------------------------------------------------------------------------
    def loss(self, model, batch, *, sigma: torch.Tensor | None, layers: range,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Loss of one batch.  sigma None: the plain classifier (end-to-end baseline) over all
        layers.  Otherwise: denoising loss of `layers` at the given per-sample σ's."""
        images, labels = batch
        if sigma is None:
            ce = F.cross_entropy(model(images), labels)
            return ce, {"ce": ce.detach()}
        sigma = sigma.to(images.device, torch.float32)
        y = F.normalize(model.label_embed(labels), dim=-1)
        eps = self.shard.draw(torch.randn, y.shape, generator).to(y.device)  # CPU generator: same draws on any device
        z = y + sigma[:, None] * eps
        logits = self.logits(model, images, z, sigma, layers)
        ce = F.cross_entropy(logits, labels, reduction="none")
        loss = weighted_loss(ce, sigma, self.noise.sigma_data, self.weighting)
        return loss, {"ce": ce.mean().detach()}

    def logits(self, model, images, z, sigma, layers: range) -> torch.Tensor:
        """head(c_skip·z + c_out·F(c_in·z; x, c_noise)) for one block's layers."""
        sd = self.noise.sigma_data
        F_out, cond = model.denoiser_output(images, scale_input(z, sigma, sd), c_noise(sigma), layers)
        return model.head(denoised(z, F_out, sigma, sd), cond)

    # ---- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, device, final: bool = False, split: str = "val") -> dict:
        """Accuracy and mean CE on `split`, the inference noise fixed by eval.seed.  final: also
        under each of eval.final_variants (e.g. B+1 σ points, the paper's App. E.1 wording, where B
        is the official code's default; probabilities averaged over several noise draws)."""
        data = self.split_data(split)
        if not self.conditioned:
            return self._accuracy(model, device, data, split)
        d = self.cfg.diffusion
        default = {"steps": d.inference_steps or self.partition.num_blocks, "draws": self.cfg.eval.noise_draws,
                   "sigma_start": d.sample_sigma_max or self.noise.sigma_max, "inference": self.cfg.eval.inference}
        result = self._accuracy(model, device, data, split, **default)
        if final:
            result.update({k if k == "inference" else f"inference_{k}": v for k, v in default.items()})
            for text in self.cfg.eval.final_variants:
                v = parse_variant(text, self.partition.num_blocks)
                name = ",".join(f"{k}={v[k]:g}" if k != "inference" else f"{k}={v[k]}" for k in VARIANT_KEYS if k in v)
                result[f"{split}_acc@{name}"] = self._accuracy(model, device, data, split, **{**default, **v})[f"{split}_acc"]
        return result

    def _accuracy(self, model, device, data: ImageSplit, split: str, steps: int = 0, draws: int = 1,
                  sigma_start: float = 0.0, inference: str = "bench") -> dict:
        """Accuracy of the argmax of the class probabilities averaged over `draws` inference noises."""
        was_training = model.training
        model.eval()
        g = torch.Generator().manual_seed(self.cfg.eval.seed)
        split_data, bs = data, self.cfg.eval.batch_size
        correct, nll = 0, 0.0
        for start in range(0, len(split_data), bs):
            x, y = self._images(split_data, torch.arange(start, min(len(split_data), start + bs)), device)
            probs = sum(self.predict(model, x, partition=self.partition if self.conditioned else None,
                                     layout=self.layout, inference_steps=steps, sigma_start=sigma_start,
                                     generator=g, inference=inference).float().softmax(-1)
                        for _ in range(draws)) / draws
            correct += int((probs.argmax(-1) == y).sum())
            nll += float(F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum"))
        model.train(was_training)
        return {f"{split}_acc": correct / len(split_data), f"{split}_ce": nll / len(split_data)}

    @torch.no_grad()
    def predict(self, model, images, *, partition: Partition | None, layout: BlockLayout | None,
                inference_steps: int = 0, sigma_start: float = 0.0,
                generator: torch.Generator | None = None, inference: str = "bench") -> torch.Tensor:
        """Logits.  partition None: the plain classifier; else the chained denoising blocks,
        starting from σ_start·ε (σ_start = σ_max unless given), or from √(1+σ_start²)·ε with the
        raw label table in D under inference="official" (the official code's choices)."""
        if partition is None:
            return model(images)
        steps = inference_steps or partition.num_blocks
        sigmas = sigmas_equiprobable(self.noise, steps, sigma_start or None)
        official = inference == "official"
        E = model.label_embed.weight if official else F.normalize(model.label_embed.weight, dim=-1)
        n = images.shape[0]

        def run(z, sigma: float, block: int) -> torch.Tensor:
            s = torch.full((n,), sigma, device=images.device)
            return self.logits(model, images, z, s, layout.layers_of(block))

        def denoise(z, sigma: float, block: int) -> torch.Tensor:
            return run(z, sigma, block).softmax(-1) @ E

        eps = torch.randn((n, E.shape[1]), generator=generator).to(images.device)
        start = (1 + float(sigmas[0]) ** 2) ** 0.5 if official else float(sigmas[0])
        z = sample_chain(denoise, start * eps, sigmas, partition)
        last = float(sigmas[-1])
        return run(z, last, partition.block_of(last))
