"""Built-in models. ``get(name)`` returns a model in fastdiff's convention ``model(x, sigma, **cond)``."""

from fastdiff.models.gmm import GaussianMixture, builtin_gmm

MODELS = {"gmm": builtin_gmm}


def get(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]()


__all__ = ["GaussianMixture", "builtin_gmm", "get", "MODELS"]
