"""The DiffusionBlocks method core: pure functions on tensors, no model architecture."""

from bench.diffusion.masking import (MaskingPartition, MaskingSchedule, make_masking_partition, masking_edges,
                                     md4_nelbo, sample_t)
from bench.diffusion.noise import LogNormalNoise, sample_sigma
from bench.diffusion.partition import STRATEGIES, Partition, make_partition, partition_edges
from bench.diffusion.precond import (WEIGHTINGS, c_in, c_noise, c_out, c_skip, denoised, loss_weight, scale_input,
                                     weighted_loss)
from bench.diffusion.sampler import (GRIDS, euler_step, make_sigmas, sample_chain, sigmas_equiprobable,
                                     sigmas_karras, steps_per_block)

__all__ = [
    "LogNormalNoise", "sample_sigma", "STRATEGIES", "Partition", "make_partition", "partition_edges",
    "c_in", "c_noise", "c_out", "c_skip", "denoised", "loss_weight", "scale_input", "GRIDS", "euler_step",
    "make_sigmas", "sample_chain", "sigmas_equiprobable", "sigmas_karras", "steps_per_block", "WEIGHTINGS",
    "weighted_loss", "MaskingPartition", "MaskingSchedule", "make_masking_partition", "masking_edges", "md4_nelbo",
    "sample_t",
]
