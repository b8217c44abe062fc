"""The built-in Gaussian mixture written as a discrete-time VP network, for tests against diffusers.

``MixtureNet(gmm, alphas_cumprod, prediction)(x_vp, t, class_labels=None) -> eps, v or x0``: the exact
mixture denoiser seen through diffusers' convention, so both sides of a comparison call one smooth, real network.
"""

import torch

from fastdiff import denoisers


class MixtureNet:
    def __init__(self, gmm, alphas_cumprod, prediction):
        self.gmm, self.prediction = gmm, prediction
        self.grid = denoisers.VPDenoiser(None, alphas_cumprod)
        self.calls = 0

    def __call__(self, x_vp, t, class_labels=None):
        self.calls += 1
        dtype = x_vp.dtype
        x_vp = x_vp.double()
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_vp.shape[0])
        s = self.grid.t_to_sigma(t).reshape(-1, 1, 1, 1)
        x = x_vp * torch.sqrt(1 + s**2)
        d = self.gmm(x, s.flatten(), class_labels=class_labels)
        eps = (x - d) / s
        out = {"eps": eps, "x0": d, "v": (eps - s * d) / torch.sqrt(1 + s**2)}[self.prediction]
        return out.to(dtype)
