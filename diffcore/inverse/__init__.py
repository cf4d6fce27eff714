"""Inverse problems with diffusion priors, measured against exact posteriors.

- :mod:`diffcore.inverse.operators`: linear forward models :math:`y = Ax + \\sigma_y n`
  (denoising, inpainting, blur, super-resolution, MRI, CT) with exact adjoints,
  pseudo-inverses, data steps and, where simple, SVDs.
- :mod:`diffcore.inverse.solvers`: diffusion posterior solvers with one signature
  (``SOLVERS``): replacement, DPS, PiGDM, DDRM, RED-diff, DDS, DiffPIR.
- :mod:`diffcore.inverse.pnp`: plug-and-play priors read as a score-based method (PnP-PGD,
  PnP-ADMM, DPIR-style HQS, RED), the PnP denoiser of a diffusion model, classical denoisers, and
  total variation with its exact and closed-form proximal operators; PnP-DM, a posterior
  sampler whose prior step is a diffusion model.
- :mod:`diffcore.inverse.blind`: blind deblurring, image and kernel unknown (Blind-PnPDM).
- :mod:`diffcore.inverse.measurements`: priors learned from measurements only: MSM's partial
  denoisers and their aggregation, SelfDB's self-supervised bridge loss, and the score-based
  KL between two priors, from clean data or from measurements.
- :mod:`diffcore.inverse.particles`: posterior sampling with particles: twisted sequential
  Monte Carlo (asymptotically exact), active subsampling, two priors at once, and FlowChef's
  steering without backpropagation (``PARTICLE_SOLVERS``, in the solvers' signature).
- :mod:`diffcore.inverse.physics`: physics in the loop: slice-stacked operators and
  through-plane TV by ADMM (DiffusionMBIR), data consistency at every step for MRI, the
  unrolled posterior mean (Diff-Unfolding) and RELD.

The exact posterior of a Gaussian-mixture prior is
:meth:`diffcore.analytic.GaussianMixture.posterior`.
"""

from diffcore.inverse import blind, measurements, operators, particles, physics, pnp, solvers
from diffcore.inverse.operators import measure
from diffcore.inverse.solvers import SOLVERS

__all__ = [
    "operators",
    "solvers",
    "pnp",
    "blind",
    "measurements",
    "particles",
    "physics",
    "measure",
    "SOLVERS",
]
