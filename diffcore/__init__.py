"""diffcore: the algorithms of *The Principles of Diffusion Models*, checked against exact answers.

The spine: a forward process (:mod:`diffcore.processes`), the targets a model may predict and
their conversions (:mod:`diffcore.targets`), exact Gaussian and Gaussian-mixture models
(:mod:`diffcore.analytic`), and the samplers that consume a denoiser (:mod:`diffcore.samplers`).
"""

from diffcore import analytic, processes, samplers, targets

__all__ = ["analytic", "processes", "samplers", "targets"]
__version__ = "0.1.0"
