"""diffcore: the algorithms of *The Principles of Diffusion Models*, checked against exact answers.

The spine: a forward process (:mod:`diffcore.processes`), the targets a model may predict and their
conversions (:mod:`diffcore.targets`), exact Gaussian and Gaussian-mixture models
(:mod:`diffcore.analytic`), and the samplers that consume a denoiser (:mod:`diffcore.samplers`).
Around it: networks (:mod:`diffcore.nets`), losses and the training loop (:mod:`diffcore.train`),
data sets that ship with the packages (:mod:`diffcore.data`), likelihoods through the PF-ODE
(:mod:`diffcore.likelihood`) and distances between laws and samples (:mod:`diffcore.metrics`);
classifier and classifier-free guidance (:mod:`diffcore.guidance`) and flow maps: consistency
models, CTM and MeanFlow (:mod:`diffcore.flowmap`); and inverse problems with diffusion priors, PnP
and exact posteriors (:mod:`diffcore.inverse`). Every sampler and solver runs on one stepping
engine (:mod:`diffcore.stepping`). Diffusions that start from the degraded image (RDDM, Resfusion,
ResShift) are in :mod:`diffcore.residual`, mean-reverting diffusions and diffusion bridges in
:mod:`diffcore.bridges`, multiplicative (geometric Brownian) diffusion of positive data in
:mod:`diffcore.multiplicative`, per-frequency (shortest-path) diffusion in
:mod:`diffcore.spectral`, joint image and label diffusion in :mod:`diffcore.multitask`, noise shaped by a segmentation
(SAM-DiffSR) or made of deformations (DRDM) in :mod:`diffcore.structured`; exact
inversion of samplers (DDIM inversion, EDICT, BDIA) in :mod:`diffcore.inversion`, denoising MCMC in
:mod:`diffcore.dmcmc` and optimal start noise for conditional samplers in :mod:`diffcore.boundary`;
MMD fine-tuning through a few-step sampler in :mod:`diffcore.finetune` and post-training
quantisation in :mod:`diffcore.quantize`; conservativity, gauge freedom and intrinsic dimension
of a learned field in :mod:`diffcore.gauge`. The pictures the chapters share, exact densities on a
grid, images tiled into one array and figures redrawn by sliders, are in :mod:`diffcore.plot`; what
the chapters' checks and sweeps share (seeded draws, errors against an exact answer, sweeps over
the number of model calls, explorers) in :mod:`diffcore.lab`.
"""

from diffcore import (
    analytic,
    boundary,
    bridges,
    data,
    dmcmc,
    finetune,
    flowmap,
    gauge,
    guidance,
    inverse,
    inversion,
    lab,
    likelihood,
    metrics,
    multiplicative,
    multitask,
    nets,
    plot,
    processes,
    quantize,
    residual,
    samplers,
    spectral,
    stepping,
    structured,
    targets,
    train,
)

__all__ = [
    "analytic",
    "boundary",
    "bridges",
    "data",
    "dmcmc",
    "finetune",
    "flowmap",
    "gauge",
    "guidance",
    "inverse",
    "inversion",
    "lab",
    "likelihood",
    "metrics",
    "multiplicative",
    "multitask",
    "nets",
    "plot",
    "processes",
    "quantize",
    "residual",
    "samplers",
    "spectral",
    "stepping",
    "structured",
    "targets",
    "train",
]
__version__ = "0.1.0"
