"""fastdiff inside diffusers: a drop-in scheduler and a pipeline loop.

* :class:`FastDiffScheduler` is a diffusers scheduler (``SchedulerMixin``/``ConfigMixin``) that steps any fastdiff
  solver along any schedule, a fastdiff named schedule or a learned LD3 file::

      pipe.scheduler = FastDiffScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")

  The pipeline keeps its own loop and its own classifier-free guidance, so every step runs both passes.
* :class:`PipelineSampler` (and the one-shot :func:`sample_pipeline`) run a pipeline's UNet or transformer
  through fastdiff's own loop instead: coefficients on the device, a CUDA graph of the whole loop if asked for,
  and interval guidance that skips the unconditional half of the batch outside ``(sigma_lo, sigma_hi]``. They
  live in :mod:`fastdiff.integrations.diffusers_pipelines` and are importable from here.
* :func:`codi_student` (with :class:`UNet2DModelAdapter`) makes a CoDi student of a ``UNet2DModel``: the UNet
  plus a ControlNet-like adapter, trained by :mod:`fastdiff.train.codi`.

Conventions. A scheduler's samples live in the model's own space, as diffusers' DDIM, DPM-Solver and UniPC
schedulers keep them: ``x_vp = x / sqrt(1 + sigma^2)`` for a VP (DDPM-family) model, ``x_t = x / (1 + sigma)``
for a rectified-flow model, where ``x = x0 + sigma * eps`` is fastdiff's VE state. So ``init_noise_sigma`` is 1
(unless the source scheduler starts from ``sigma_max``: see :attr:`FastDiffScheduler.init_noise_sigma`) and
``scale_model_input`` is the identity (except under a learned schedule with decoupled evaluation sigmas).
A flow model's first noise level ``t = 1`` is ``sigma = inf`` in the VE form; fastdiff steps from
``t = 1 - 1e-9`` instead (``sigma = 1e9``), which changes the first step's coefficients by about 1e-9.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from fastdiff import schedules, solvers
from fastdiff.arguments import as_real
from fastdiff.denoisers import EDMPrecond, VPDenoiser, discrete_sigmas, to_denoised
from fastdiff.solvers import Denoised
from fastdiff.train.codi import AdaptedNetwork, AdapterBase

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow": "flow"}
FLOW_T_MAX = 1 - 1e-9  # t = 1 is sigma = inf in the VE form; see the module docstring

# Schedulers whose samples are the VE state x = x0 + sigma * eps (their scale_model_input divides by
# sqrt(1 + sigma^2)); their init_noise_sigma is a VE standard deviation: sigma_max with timestep_spacing "linspace"
# or "trailing", sqrt(1 + sigma_max^2) with "leading".
VE_STATE_SCHEDULERS = frozenset({
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
})  # fmt: skip
# Config keys that describe the source scheduler's update rule. With the source's own method (``solver=None``, or
# the fastdiff solver that reproduces it) each is honoured or refused by name; with another solver they describe
# the solver that the swap replaces.
SOLVER_KEYS = ("solver_order", "solver_type", "algorithm_type", "lower_order_final", "euler_at_final", "predict_x0",
               "disable_corrector", "solver_p", "stochastic_sampling", "noise_sampler_seed", "predictor_order",
               "corrector_order", "tau_func", "timestep_scaling", "original_inference_steps")  # fmt: skip


@dataclass
class FastDiffSchedulerOutput(BaseOutput):
    """``prev_sample``: the state the pipeline evaluates next (the final sample after the last step), shape and
    dtype of the ``sample`` given to :meth:`FastDiffScheduler.step`. ``pred_original_sample``: this
    evaluation's estimate of x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class _NeedEvaluation(Exception):
    """Raised inside a replayed solver step when it asks for an evaluation the pipeline has not made yet."""

    def __init__(self, x: torch.Tensor):
        self.x = x


class _Schedule:
    """What :meth:`FastDiffScheduler.set_timesteps` fixes, as host values: VE ``sigmas`` ``[N + 1]`` (the
    solver's), ``model_sigmas`` ``[N + 1]`` (where the model is called at the levels; LD3 may decouple them), and
    ``evals``: per model evaluation, an :class:`_Evaluation`."""

    def __init__(self, sigmas: list[float], model_sigmas: list[float], evals: list[_Evaluation]):
        self.sigmas, self.model_sigmas, self.evals = sigmas, model_sigmas, evals


@dataclass(frozen=True)
class _Evaluation:
    """One model call: in solver step ``step``, of the state at VE level ``state_sigma`` (what the pipeline's
    sample is scaled by), with the model at ``model_sigma`` and network ``timestep``. A level's evaluation has the
    schedule's values; a solver's point between levels (DPM-Solver-2's midpoint) has its own sigma for both."""

    step: int
    state_sigma: float
    model_sigma: float
    timestep: float


def _evaluations(solver: solvers.Solver, sigmas: list[float], model_sigmas: list[float], timesteps: list[float],
                 timestep_of: Callable[[float], float]) -> list[_Evaluation]:  # fmt: skip
    """Every model evaluation of ``solver`` along the schedule, in order: a dry run of the solver on a
    one-element state, recording where it calls the model. ``timesteps``: the network timestep of each level of
    ``model_sigmas``; ``timestep_of``: that of a sigma between levels."""
    evals: list[_Evaluation] = []
    state, x = solver.start(), torch.zeros(1, dtype=torch.float64)
    for i in range(len(sigmas) - 1):

        def evaluate(xi, s, i=i):
            s = float(s)
            m = next((m for m in range(i, len(model_sigmas)) if model_sigmas[m] == s), None)
            if m is not None:
                evals.append(_Evaluation(i, sigmas[m], s, timesteps[m]))
            else:
                evals.append(_Evaluation(i, s, s, timestep_of(s)))
            return Denoised(torch.zeros_like(xi))

        solver.step(i, x, model_sigmas, evaluate, state, solver.stages(sigmas, i), noise=lambda interval: x)
    return evals


def _scheduler_classes_of(config: Mapping[str, Any]) -> list[str]:
    """The diffusers schedulers a config may belong to, shortest name (the base one) first. A live scheduler's
    config does not name its class, but it holds exactly that class's ``__init__`` parameters; some classes share
    them (DDIM and its parallel variant; LMS, KDPM2 and KDPM2Ancestral; LCM and TCD)."""
    matches = []
    for name in dir(diffusers):
        if not name.endswith("Scheduler") or name == "FastDiffScheduler":
            continue
        cls = getattr(diffusers, name, None)
        if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
            params = set(inspect.signature(cls.__init__).parameters) - {"self"}
            if params == set(config):
                matches.append(name)
    return sorted(matches, key=lambda n: (len(n), n))


def _refuse(source: str, key: str, value, why: str) -> ValueError:
    return ValueError(f"{source} config {key}={value!r} is not reproduced by FastDiffScheduler: {why}")


# Recognised diffusers schedulers that no fastdiff solver reproduces in FastDiffScheduler today, with the reason
# (what would be needed). ``solver=None`` from their configs is refused with it; an explicit ``solver=`` is a swap.
UNREPRODUCED = {
    "FlowMapEulerDiscreteScheduler": "it is a flow-map (two-time) sampler with no fastdiff equivalent",
}


# Schedulers that evaluate the model between the levels of their schedule (DPM-Solver-2's log-sigma midpoint).
INTERLEAVED = frozenset({"KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"})


def _native_solver(source: str, cfg: Mapping[str, Any]) -> tuple[str, dict] | None:
    """``(fastdiff solver name, options)`` that reproduce the diffusers scheduler ``source`` with config ``cfg``
    (its solver keys, :data:`SOLVER_KEYS`, honoured or refused by name), or None when no fastdiff solver does."""
    simple = {"EulerDiscreteScheduler": "euler", "HeunDiscreteScheduler": "heun", "DDIMScheduler": "ddim",
              "EulerAncestralDiscreteScheduler": "euler_ancestral", "LMSDiscreteScheduler": "lms",
              "FlowMatchEulerDiscreteScheduler": "euler", "EDMEulerScheduler": "euler",
              "KDPM2DiscreteScheduler": "dpm_2", "KDPM2AncestralDiscreteScheduler": "dpm_2_ancestral",
              "DPMSolverSDEScheduler": "dpmpp_sde", "LCMScheduler": "lcm", "TCDScheduler": "tcd"}  # fmt: skip
    if cfg.get("stochastic_sampling"):
        raise _refuse(source, "stochastic_sampling", True, "pass solver= for a deterministic swap")
    if source == "FlowMatchEulerDiscreteScheduler" and cfg.get("invert_sigmas"):
        raise _refuse(source, "invert_sigmas", True, "its sigmas rise from 0 to 1 (Mochi's convention)")
    if source in simple:
        return simple[source], {}
    if source == "FlowMatchHeunDiscreteScheduler":
        return "heun", {"time": "flow"}
    if source in ("DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler"):
        algorithm = cfg.get("algorithm_type", "dpmsolver++")
        if algorithm == "sde-dpmsolver++" and source == "DPMSolverMultistepScheduler":
            return _sde_dpmsolver(source, cfg)
        if algorithm != "dpmsolver++":
            raise _refuse(source, "algorithm_type", algorithm, "'dpmsolver++' is, and 'sde-dpmsolver++' for "
                          "DPMSolverMultistepScheduler (pass solver=)")  # fmt: skip
        order = cfg.get("solver_order", 2)
        if order not in (1, 2, 3):
            raise _refuse(source, "solver_order", order, "orders 1, 2 and 3 are")
        if order > 1 and cfg.get("solver_type", "midpoint") != "midpoint":
            raise _refuse(source, "solver_type", cfg["solver_type"], "fastdiff's DPM-Solver++ is the midpoint form")
        if cfg.get("euler_at_final") and cfg.get("final_sigmas_type", "zero") != "zero":
            raise _refuse(source, "euler_at_final", True, "the last step keeps its order")
        if order == 1:
            return "ddim", {}
        return {2: "dpmpp_2m", 3: "dpmpp_3m"}[order], {"lower_order_final": cfg.get("lower_order_final", True)}
    if source == "DPMSolverSinglestepScheduler":
        if cfg.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
            raise _refuse(source, "algorithm_type", cfg["algorithm_type"], "only 'dpmsolver++' is (pass solver=)")
        return "dpmpp_singlestep", {"order": cfg.get("solver_order", 2), "solver_type": cfg.get("solver_type",
                                    "midpoint"), "lower_order_final": cfg.get("lower_order_final", True)}  # fmt: skip
    if source == "SASolverScheduler":
        if cfg.get("algorithm_type", "data_prediction") != "data_prediction":
            raise _refuse(source, "algorithm_type", cfg["algorithm_type"], "only 'data_prediction' is")
        if cfg.get("tau_func") is not None:
            raise _refuse(source, "tau_func", cfg["tau_func"], "only its default (tau = 1 on timesteps 200-800) is")
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"):
            if cfg.get(key):
                raise _refuse(source, key, True, "its schedule then ends with a step of length 0")
        # tau_interval (timesteps 200-800 in sigmas) is set from the model's grid in FastDiffScheduler.__init__
        return "sa_solver", {"predictor_order": cfg.get("predictor_order", 2),
                             "corrector_order": cfg.get("corrector_order", 2),
                             "lower_order_final": cfg.get("lower_order_final", True)}  # fmt: skip
    if source == "DEISMultistepScheduler":
        if cfg.get("algorithm_type", "deis") != "deis" or cfg.get("solver_type", "logrho") != "logrho":
            raise _refuse(source, "algorithm_type/solver_type", (cfg.get("algorithm_type"), cfg.get("solver_type")),
                          "only DEIS in log-rho is (diffusers implements no other)")  # fmt: skip
        return "deis", {"max_order": cfg.get("solver_order", 2), "deis_mode": "logrho",
                        "lower_order_final": cfg.get("lower_order_final", True)}  # fmt: skip
    if source == "UniPCMultistepScheduler":
        if not cfg.get("predict_x0", True):
            raise _refuse(source, "predict_x0", False, "fastdiff's UniPC is the data-prediction form")
        if cfg.get("solver_p") is not None:
            raise _refuse(source, "solver_p", cfg["solver_p"], "UniPC's predictor is its own")
        disabled = list(cfg.get("disable_corrector") or [])
        if disabled:
            raise _refuse(source, "disable_corrector", disabled, "the corrector runs on every step or none "
                          "(solver_options={'corrector': False})")  # fmt: skip
        return "unipc", {"order": cfg.get("solver_order", 2), "variant": cfg.get("solver_type", "bh2"),
                         "lower_order_final": cfg.get("lower_order_final", True)}  # fmt: skip
    return None


def _sde_dpmsolver(source: str, cfg: Mapping[str, Any]) -> tuple[str, dict]:
    """DPM-Solver++(2M) SDE (``algorithm_type="sde-dpmsolver++"``, order 2): fastdiff's ``dpmpp_2m_sde`` with
    ``eta = 1``, its ``solver_type``, one draw a step from the step's generator."""
    order = cfg.get("solver_order", 2)
    if order != 2:
        raise _refuse(source, "solver_order", order, "with 'sde-dpmsolver++' only order 2 is (order 3 warms up "
                      "and ends with the midpoint second-order update, k-diffusion's dpmpp_3m_sde with its "
                      "own)")  # fmt: skip
    if cfg.get("final_sigmas_type", "zero") != "zero" or cfg.get("euler_at_final"):
        raise _refuse(source, "final_sigmas_type", cfg.get("final_sigmas_type"), "with 'sde-dpmsolver++' the last "
                      "step must go to sigma = 0")  # fmt: skip
    return "dpmpp_2m_sde", {"eta": 1.0, "solver_type": cfg.get("solver_type", "midpoint")}


def _threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022) of ``x0 [B, ...]``: per sample, ``s`` is the ``ratio``
    quantile of ``|x0|`` clamped to ``[1, max_value]``, and ``x0`` is clamped to ``[-s, s]`` and divided by ``s``.
    Computed in float32 at least, returned in ``x0``'s dtype."""
    flat = x0.reshape(x0.shape[0], -1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1, max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


class FastDiffScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that steps a fastdiff solver.

    Built from any DDPM-family or flow-matching scheduler's config, it reads the training noise schedule
    (``num_train_timesteps``, ``beta_*``, ``trained_betas``, ``rescale_betas_zero_snr``; or flow ``shift`` and
    dynamic shifting) and ``prediction_type`` from it, and adds fastdiff's own options:

    Args:
        solver: a fastdiff solver name (``euler``, ``heun``, ``ddim``, ``dpmpp_2m``, ``dpmpp_3m``, ``ipndm``,
            ``unipc``...), with ``solver_options`` (e.g. ``{"order": 3}`` for UniPC). None: the solver that
            reproduces the source scheduler (Euler, EulerAncestral, Heun, LMS, DDIM, DPM-Solver++ of order 1-3,
            UniPC, flow-matching Euler with static or dynamic shift, EDM Euler, EDM DPM-Solver++), its solver
            keys honoured or refused by name (:data:`UNREPRODUCED`: the schedulers refused, and why);
            ``dpmpp_2m`` without a source. The source's own solver named explicitly takes its keys
            (``solver_order``...) as default options; another solver replaces them. The source's
            ``clip_sample``/``thresholding`` of x0 are applied to every estimate, as the source applies them.
        schedule: ``None`` steps through the noise levels that the scheduler this config came from
            (``from_config(pipe.scheduler.config)``; else diffusers' Euler, or flow-matching Euler, scheduler)
            would step through, with all its options (``timestep_spacing``, ``steps_offset``,
            ``use_karras_sigmas``, ``shift``...), so that a solver swap is the only change. Schedulers without
            sigmas (DDIM, PNDM) end per ``final_sigmas_type``.
            A fastdiff schedule name (``karras``, ``logsnr_uniform``, ``time_uniform``; VP models) spans the
            model's whole training range, with ``schedule_options`` (e.g. ``{"rho": 7}``).
        learned_schedule: the path of a fastdiff schedule file (an LD3 result), used as is, with its evaluation
            sigmas; ``num_inference_steps`` must then be its step count or None.
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``; None means ``flow`` when the
            config is a flow-matching one (it has ``shift``), else ``epsilon``.
        reference_scheduler: ``{"class_name", "config"}`` of the scheduler whose noise levels are the default;
            :meth:`from_config` fills it in.

    The last step goes to sigma = 0 and returns the final denoised estimate (diffusers'
    ``final_sigmas_type="zero"``); ``final_sigmas_type="sigma_min"`` stops at the smallest training sigma instead.
    ``timesteps`` has one entry per model evaluation (Heun: two a step, as diffusers' Heun scheduler), and
    ``order`` is the most evaluations a step makes.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        interpolation_type: str = "linear",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        final_sigmas_type: str = "zero",
        shift: float | None = None,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int | None = 256,
        max_image_seq_len: int | None = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        time_shift_type: str = "exponential",
        solver: str | None = None,
        solver_options: dict | None = None,
        schedule: str | None = None,
        schedule_options: dict | None = None,
        learned_schedule: str | None = None,
        reference_scheduler: dict | None = None,
    ):
        kind = prediction_type or ("flow" if shift is not None else "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {sorted(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.prediction = PREDICTION_TYPES[kind]
        source = reference_scheduler["class_name"] if reference_scheduler else None
        source_cfg = dict(reference_scheduler["config"]) if reference_scheduler else {}
        # diffusers' EDM schedulers: the state is the VE x, the network sees c_in x and c_noise = log(sigma) / 4,
        # and its output is EDM-preconditioned: D = c_skip x + c_out F (c_out negated for v_prediction).
        self._edm = EDMPrecond(None, source_cfg.get("sigma_data", 0.5)) if source and source.startswith("EDM") else None
        if self._edm is not None and self.prediction not in ("eps", "v"):
            raise _refuse(source, "prediction_type", kind, "diffusers' EDM preconditioning is for epsilon and "
                          "v_prediction")  # fmt: skip
        if self._edm is not None and source_cfg.get("final_sigmas_type", "zero") != "zero":
            raise _refuse(source, "final_sigmas_type", source_cfg["final_sigmas_type"], "its last step goes from "
                          "sigma_min to sigma_min, a zero step that fastdiff's schedules cannot hold")  # fmt: skip
        self.solver = self._choose_solver(solver, solver_options, source, source_cfg)
        self._x0_transform = self._x0_transform_of(source_cfg)
        self._halve_output = source_cfg.get("variance_type") in ("learned", "learned_range")
        # diffusers' LCMScheduler applies LCM's boundary condition to the network's x0 prediction itself:
        # f = c_out x0 + c_skip x_vp, the scalings at timestep * timestep_scaling (fastdiff's lcm then re-noises f).
        self._lcm_scaling = (
            source_cfg.get("timestep_scaling", 10.0)
            if source == "LCMScheduler" and isinstance(self.solver, solvers.LCM)
            else None
        )
        # diffusers' DDIM clips (or thresholds) its x0 prediction but keeps the network's noise direction
        # (use_clipped_model_output=False, what pipelines pass): x_next = x0_clipped + sigma_next * eps_network.
        self._ddim_keeps_eps = (
            self._x0_transform is not None
            and source in ("DDIMScheduler", "DDIMParallelScheduler")
            and isinstance(self.solver, solvers.DDIM)
        )
        if schedule is not None and schedule not in schedules.SCHEDULES:
            raise ValueError(f"schedule must be None (diffusers' own) or one of {sorted(schedules.SCHEDULES)}, "
                             f"got {schedule!r}")  # fmt: skip
        if schedule is not None and self.prediction == "flow":
            raise ValueError("fastdiff's named schedules are for VP models; a flow model takes diffusers' flow "
                             "schedule, custom sigmas or a learned schedule file")  # fmt: skip
        if schedule is not None and learned_schedule is not None:
            raise ValueError("give a named schedule or a learned schedule file, not both")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        self._reference = self._reference_scheduler()
        vp = self.prediction != "flow" and self._edm is None
        self.alphas_cumprod = self._reference.alphas_cumprod.double() if vp else None
        self._grid = VPDenoiser(None, self.alphas_cumprod) if vp else None
        sa = isinstance(self.solver, solvers.SASolver) and self.solver.tau_interval is None
        if source == "SASolverScheduler" and sa and self._grid is not None:
            # diffusers' default tau_func: tau = 1 on the timesteps 200..800, as sigmas of the model's grid
            lo, hi = (float(self._grid.t_to_sigma(torch.tensor(t))) for t in (200.0, 800.0))
            self.solver = solvers.get("sa_solver", **{**vars(self.solver), "tau_interval": (lo, hi)})
        self._step_solvers: dict = {}  # per-step solvers of the pipeline's eta (TCD's gamma)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.zeros(0)
        self.sigmas = torch.zeros(0)
        self._schedule: _Schedule | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @staticmethod
    def _choose_solver(solver, options, source, cfg) -> solvers.Solver:
        """The fastdiff solver: ``solver`` (None: the one that reproduces the source scheduler, else
        ``dpmpp_2m``), with the source's solver keys as its options where it is the source's own method and
        ``options`` leaves them unset."""
        native = _native_solver(source, cfg) if source else None
        if solver is None and source is not None and native is None:
            why = f": {UNREPRODUCED[source]}" if source in UNREPRODUCED else ""
            raise ValueError(f"no fastdiff solver reproduces {source}{why}; pass solver= (one of "
                             f"{sorted(solvers.SOLVERS)})")  # fmt: skip
        if solver is None:
            solver, defaults = native or ("dpmpp_2m", {})
        else:
            defaults = native[1] if native is not None and native[0] == solver else {}
        return solvers.get(solver, **{**defaults, **(options or {})})

    @staticmethod
    def _x0_transform_of(cfg: Mapping[str, Any]):
        """The source scheduler's transformation of the x0 prediction (``thresholding``, else ``clip_sample``
        with ``clip_sample_range``), or None: applied to the (guided) estimate before the solver uses it."""
        if cfg.get("thresholding"):
            ratio, top = cfg.get("dynamic_thresholding_ratio", 0.995), cfg.get("sample_max_value", 1.0)
            return lambda d: _threshold(d, ratio, top)
        if cfg.get("clip_sample"):
            r = cfg.get("clip_sample_range", 1.0)
            return lambda d: d.clamp(-r, r)
        return None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build from another scheduler's config, which is also kept (``reference_scheduler``): that scheduler's
        own ``set_timesteps`` then gives the default noise levels, so that a solver swap is the only change.
        ``config`` may be the scheduler itself (``from_config(pipe.scheduler)``), which names its class: a config
        alone is refused without ``solver=`` when classes that step differently share its keys (LMS and KDPM2)."""
        named = None
        if isinstance(config, SchedulerMixin):  # a live scheduler names its class; its config alone may not
            named, config = type(config).__name__, config.config
        config = dict(config or {})
        own = {k: v for k, v in config.items() if not k.startswith("_")}
        if "reference_scheduler" not in kwargs and "solver" not in own:  # another scheduler's config
            source = named or config.get("_class_name")
            if source is None:
                candidates = _scheduler_classes_of(own)
                methods = {c.replace("Parallel", "") for c in candidates}
                if len(methods) > 1 and kwargs.get("solver") is None:
                    raise ValueError(f"this config is any of {', '.join(candidates)}, which step differently; pass "
                                     "the scheduler itself (from_config(pipe.scheduler)), a config with "
                                     "'_class_name', or solver=")  # fmt: skip
                source = candidates[0] if candidates else None
            if source and source != cls.__name__:
                kwargs["reference_scheduler"] = {"class_name": source, "config": own}
            # diffusers drops the keys a config left at their defaults (``_use_default_values``), a flow
            # scheduler's ``shift=1.0`` included, so the flow prediction is named rather than inferred from it.
            if source and source.startswith("FlowMatch") and "prediction_type" not in kwargs:
                kwargs["prediction_type"] = "flow"
            # DDIM's and PNDM's set_alpha_to_one=False end at the first training level, not at sigma = 0; so does
            # TCD, whose last step carries its estimates to timestep 0.
            final_at_grid = own.get("set_alpha_to_one") is False or source == "TCDScheduler"
            if final_at_grid and "final_sigmas_type" not in kwargs:
                kwargs["final_sigmas_type"] = "sigma_min"
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _reference_scheduler(self):
        """The diffusers scheduler whose noise levels :meth:`set_timesteps` uses by default: the one this
        config came from, else diffusers' Euler scheduler (flow models: its flow-matching Euler scheduler)."""
        ref = self.config.reference_scheduler
        if ref is not None:
            cls = getattr(diffusers, ref["class_name"], None)
            if cls is None or not hasattr(cls, "set_timesteps"):
                raise ValueError(f"unknown diffusers scheduler {ref['class_name']!r} in reference_scheduler")
            return cls.from_config(ref["config"])
        cls = FlowMatchEulerDiscreteScheduler if self.prediction == "flow" else EulerDiscreteScheduler
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in self.config.items() if k in accepted and v is not None}
        kwargs.pop("prediction_type", None)
        return cls(**kwargs)

    def _reference_schedule(self, n, sigmas, timesteps, mu) -> tuple[torch.Tensor, list[float]]:
        """``(VE sigmas [N + 1], network timesteps [N])`` of the reference scheduler's ``set_timesteps``."""
        ref = self._reference
        params = inspect.signature(ref.set_timesteps).parameters
        kwargs = {k: v for k, v in (("sigmas", sigmas), ("timesteps", timesteps), ("mu", mu)) if v is not None}
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"{type(ref).__name__}.set_timesteps takes no {', '.join(unknown)}")
        ref.set_timesteps(n, device="cpu", **kwargs)
        ts = ref.timesteps.double().cpu()
        if type(ref).__name__ in INTERLEAVED:
            # Their timesteps interleave the levels with the midpoints they evaluate between them (fastdiff's
            # solver finds those itself), and their sigmas repeat each inner level.
            return torch.unique_consecutive(ref.sigmas.double().cpu()), ts[0::2].tolist()
        first = torch.cat([torch.tensor([True]), ts[1:] != ts[:-1]])  # Heun and PNDM repeat timesteps
        sig = getattr(ref, "sigmas", None)
        if isinstance(sig, torch.Tensor) and len(sig) == len(ts) + 1:
            sig = torch.cat([sig.double().cpu()[:-1][first], sig.double().cpu()[-1:]])
            if self.prediction == "flow":
                t = sig.clamp(max=FLOW_T_MAX)
                sig = t / (1 - t)
        else:  # DDIM, PNDM, DDPM...: integer timesteps on the training grid
            last = 0.0 if self.config.final_sigmas_type == "zero" else self._grid.sigma_min
            sig = torch.cat([discrete_sigmas(self.alphas_cumprod, ts[first].round())[:-1], torch.tensor([last])])
        return sig, ts[first].tolist()

    # ---------------------------------------------------------------------------------- diffusers interface

    @property
    def init_noise_sigma(self) -> float:
        """What the pipeline multiplies unit noise by: the source scheduler's starting noise, in this scheduler's
        (the model's) space. 1, the exact start ``sqrt(1 + sigma_max^2)`` of the VE state, except for sources whose
        state is the VE state (Euler, Heun, LMS... :data:`VE_STATE_SCHEDULERS`) with ``timestep_spacing``
        ``"linspace"`` or ``"trailing"``, which start from ``sigma_max`` (``sigma_max / sqrt(1 + sigma_max^2)``
        here), and diffusers' EDM schedulers, whose state is the VE state: ``sqrt(1 + sigma_max^2)`` of their
        config (of the first sigma under a fastdiff schedule)."""
        ref = self.config.reference_scheduler
        own = self._schedule is None or self.config.learned_schedule is not None or self.config.schedule is not None
        if self._edm is not None:  # diffusers' EDM schedulers start from sqrt(sigma_max^2 + 1) of their config
            own_top = self._schedule is not None and own
            top = self._schedule.sigmas[0] if own_top else ref["config"].get("sigma_max", 80.0)
            return math.sqrt(top**2 + 1)
        if own or ref is None or ref["class_name"] not in VE_STATE_SCHEDULERS:
            return 1.0
        if ref["config"].get("timestep_spacing", "linspace") not in ("linspace", "trailing"):
            return 1.0
        sigma = self._schedule.sigmas[0]
        return sigma / math.sqrt(1 + sigma**2)

    @property
    def order(self) -> int:
        """The most model evaluations one step makes (diffusers pipelines size their progress bars by it)."""
        return len(self.solver.points([2.0, 1.0, 0.0], 0))

    @property
    def step_index(self) -> int | None:
        """Index of the next model evaluation in :attr:`timesteps`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at evaluation ``begin_index`` (image-to-image pipelines skip the first steps)."""
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        timesteps: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Fix the schedule. ``sigmas`` and ``timesteps`` are custom schedules in the convention of the
        diffusers scheduler this config came from (VE sigmas, or flow ``t`` values; training timesteps);
        ``mu`` is flow matching's dynamic shift."""
        cfg = self.config
        if cfg.learned_schedule is not None:
            if sigmas is not None or timesteps is not None:
                raise ValueError("this scheduler uses a learned schedule file; it takes no custom sigmas/timesteps")
            sched = schedules.load_schedule(cfg.learned_schedule, solver=self.solver.name)
            n = len(sched.sigmas) - 1
            if num_inference_steps not in (None, n):
                raise ValueError(f"{cfg.learned_schedule} has {n} steps; num_inference_steps={num_inference_steps}")
            step_sig = sched.sigmas
            model_sig = sched.eval_sigmas if sched.eval_sigmas is not None else step_sig
            t_model = None
        elif cfg.schedule is not None and sigmas is None and timesteps is None:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
            if self._edm is not None:  # an EDM model's range is its source config's
                ref_cfg = cfg.reference_scheduler["config"]
                lo, hi = ref_cfg.get("sigma_min", 0.002), ref_cfg.get("sigma_max", 80.0)
            else:
                lo, hi = self._grid.sigma_min, self._grid.sigma_max
            step_sig = schedules.get(cfg.schedule, num_inference_steps, lo, hi, **(cfg.schedule_options or {}))
            model_sig, t_model = step_sig, None
        else:
            step_sig, t_model = self._reference_schedule(num_inference_steps, sigmas, timesteps, mu)
            model_sig = step_sig
        step_sig = schedules.validate(step_sig)
        model_sig = schedules.check_eval_sigmas(model_sig, step_sig, "the scheduler's evaluation sigmas")
        if self._grid is not None:
            self._grid.check_sigmas(model_sig[:-1])
        if (self.prediction == "flow" and isinstance(self.solver, solvers.Heun) and self.solver.time == "sigma"
                and step_sig[0] > 1e6):  # fmt: skip
            raise ValueError("Heun's trapezoidal step in sigma is unbounded from the flow schedule's t = 1 (sigma = "
                             "inf); use heun with time='flow' (the trapezoid in flow time), euler, dpmpp_2m, "
                             "dpmpp_3m, unipc or ipndm, or start below t = 1")  # fmt: skip
        sig, msig = step_sig.tolist(), model_sig.tolist()
        if t_model is None:
            t_model = self._timesteps_of(model_sig[:-1]).tolist()

        def timestep_of(s: float) -> float:
            return float(self._timesteps_of(torch.tensor([s], dtype=torch.float64))[0])

        evals = _evaluations(self.solver, sig, msig, t_model, timestep_of)
        self._schedule = _Schedule(sig, msig, evals)
        self.num_inference_steps = len(sig) - 1
        self.timesteps = torch.tensor([e.timestep for e in evals], dtype=torch.float32, device=device)
        self.sigmas = step_sig.float()
        self._step_index = self._begin_index = None
        self._state: dict = {}
        self._start = 0
        self._x_start: torch.Tensor | None = None
        self._recorded: list[Denoised] = []
        self._tree = None  # dpmpp_sde's Brownian path, made at the first draw

    def _timesteps_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network timestep of VE sigmas: log-sigma interpolation on the training grid (VP), ``t * T``
        with ``t = sigma / (1 + sigma)`` (flow)."""
        if self.prediction == "flow":
            return sigma / (1 + sigma) * self.config.num_train_timesteps
        if self._edm is not None:
            return sigma.log() / 4
        return self._grid.sigma_to_t(sigma)

    def _scale(self, sigma: float) -> float:
        """``x / x_model``: from the model's own space to the VE state at ``sigma``."""
        if self._edm is not None:  # diffusers' EDM schedulers keep the VE state itself
            return 1.0
        return 1 + sigma if self.prediction == "flow" else math.sqrt(1 + sigma**2)

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[:1].cpu()
        match = (self.timesteps.cpu() == t).nonzero()
        if not len(match):
            raise ValueError(f"timestep {float(t)} is not in this scheduler's timesteps; call set_timesteps and "
                             "pass its timesteps in order")  # fmt: skip
        self._step_index = int(match[0])

    def _require_schedule(self) -> _Schedule:
        if self._schedule is None:
            raise ValueError("call set_timesteps(num_inference_steps) before stepping the scheduler")
        return self._schedule

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network's input for the current evaluation: ``sample`` itself, unless a learned schedule
        evaluates the model at a sigma other than the state's (then rescaled to that sigma)."""
        sched = self._require_schedule()
        if self._step_index is None:
            self._init_step_index(timestep)
        e = sched.evals[self._step_index]
        if self._edm is not None:  # EDM's input preconditioning c_in (the state is the VE x at every sigma)
            return sample * float(self._edm.scalings(torch.tensor(e.model_sigma, dtype=torch.float64))[2])
        r = self._scale(e.state_sigma) / self._scale(e.model_sigma)
        return sample if r == 1 else sample * r

    @torch.no_grad()
    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        eta: float | None = None,
    ) -> FastDiffSchedulerOutput | tuple:
        """Take in the network's output at the current evaluation and return the next state.

        Args:
            model_output: the (guided) network output, eps, v, x0 or flow velocity as configured, shape of
                ``sample``.
            timestep: the current entry of :attr:`timesteps` (used only to find the first evaluation).
            sample: the current state, in the model's space.
            generator: where a stochastic solver draws its noise (torch's global generator by default).
            eta: what pipelines pass as their ``eta`` (they pass it to a scheduler whose ``step`` takes it): for DDIM
                the stochastic DDIM step, which in this form is ``euler_ancestral`` with that ``eta`` (the same
                draws from the generator); for TCD its ``gamma`` (None: 0.3, TCDScheduler's default); another
                solver refuses a nonzero ``eta`` rather than ignore it.

        The solver step is replayed from the step's start state with the evaluations made so far; a step that
        needs another evaluation (Heun's corrector) returns the point to evaluate as ``prev_sample``. Like every
        fastdiff sampling entry point, it records nothing for autograd.
        """
        sched = self._require_schedule()
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(sched.evals):
            raise IndexError(f"the scheduler's {len(sched.evals)} evaluations are done; call set_timesteps again")
        e = sched.evals[k]
        i = e.step
        dt = torch.promote_types(sample.dtype, torch.float32)
        x = sample.to(dt) * self._scale(e.state_sigma)
        s_model = torch.tensor(e.model_sigma, dtype=dt, device=sample.device)
        if self._halve_output and model_output.shape[1] == 2 * sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]  # learned variance: its second half is not used
        if self._edm is not None:
            c_skip, c_out, _, _ = self._edm.scalings(s_model)
            d = c_skip * x + (c_out if self.prediction == "eps" else -c_out) * model_output.to(dt)
        else:
            d = to_denoised(self.prediction, model_output.to(dt), x, s_model)
        d_raw, d = d, d if self._x0_transform is None else self._x0_transform(d)
        if self._lcm_scaling is not None:
            c_skip, c_out = solvers.consistency_scalings(e.timestep, 0.0, scale=self._lcm_scaling)
            d = c_out * d + c_skip * sample.to(dt)
        if k == 0 or k == self._begin_index or sched.evals[k - 1].step != i:  # the step's first evaluation
            if k == 0 or k == self._begin_index:
                self._start, self._state = i, self.solver.start()
            if k > 0 and sched.evals[k - 1].step == i:
                raise ValueError(f"evaluation {k} is not the first of its step; begin_index must start a step")
            self._x_start, self._recorded, self._draws = x, [], []
        self._recorded.append(Denoised(d_raw if self._ddim_keeps_eps else d))
        recorded, draws = self._recorded, self._draws

        def replay(xi, s):
            j = replay.calls
            replay.calls += 1
            if j < len(recorded):
                return recorded[j]
            raise _NeedEvaluation(xi)

        taken = 0

        def noise(interval):
            # A replayed step draws the same noise for the stages it already took.
            nonlocal taken
            taken += 1
            if taken > len(draws):
                if self._brownian:
                    draws.append(self._brownian_tree(x, generator)(*self._noise_times(interval, i)).to(x.dtype))
                else:
                    draws.append(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device))
            return draws[taken - 1]

        replay.calls = 0
        first, trial = self._start, dict(self._state)
        solver = self._solver_for(eta)
        try:
            x_next, _ = solver.step(
                i - first, self._x_start, sched.model_sigmas[first:], replay, trial,
                solver.stages(sched.sigmas[first:], i - first), noise=noise,
            )  # fmt: skip
            if self._ddim_keeps_eps:  # fed the raw estimate, then moved by (clipped - raw): see __init__
                x_next = x_next + (d - d_raw)
            prev = x_next / self._scale(sched.sigmas[i + 1])
            self._state = trial
        except _NeedEvaluation as need:
            prev = need.x / self._scale(sched.evals[k + 1].state_sigma)
        self._step_index = k + 1
        prev = prev.to(sample.dtype)
        return FastDiffSchedulerOutput(prev, d.to(sample.dtype)) if return_dict else (prev,)

    def _solver_for(self, eta: float | None) -> solvers.Solver:
        """The solver of a step the pipeline passes ``eta`` to: DDIM's ``eta`` is ``euler_ancestral``'s, TCD's
        its ``gamma`` on the model's own timesteps."""
        if isinstance(self.solver, solvers.TCD):
            gamma = self.solver.gamma if eta is None else as_real(eta, "eta")
            return self._step_solver("tcd", gamma=gamma, alphas_cumprod=self.alphas_cumprod)
        eta = 0.0 if eta is None else as_real(eta, "eta")
        if eta == 0:
            return self.solver
        if not eta > 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if isinstance(self.solver, solvers.DDIM) and self._x0_transform is None:
            return self._step_solver("euler_ancestral", eta=eta)
        raise ValueError(f"eta={eta} (the pipeline's eta) is not reproduced by FastDiffScheduler with "
                         f"{self.solver.name}: only DDIM's (without clipping) is; pass eta=0, or a stochastic "
                         "solver= with its own eta in solver_options")  # fmt: skip

    def _step_solver(self, name: str, **options) -> solvers.Solver:
        """A solver for the pipeline's ``eta``, made once per value and kept for the run's steps."""
        key = (name, *(v for k, v in sorted(options.items()) if k != "alphas_cumprod"))
        if key not in self._step_solvers:
            self._step_solvers[key] = solvers.get(name, **options)
        return self._step_solvers[key]

    @property
    def _brownian(self) -> bool:
        """Whether the solver draws noise for nested intervals of one step (dpmpp_sde: ``(sigma, sigma_mid)``,
        then ``(sigma, sigma_next)``), which must be increments of one Brownian path: independent draws bias its
        variance."""
        return isinstance(self.solver, solvers.DPMSolverPPSDE)

    def _brownian_tree(self, x: torch.Tensor, generator: torch.Generator | None):
        """The run's Brownian path over the schedule's range, made at its first draw: a torchsde tree of the
        state's shape. From a DPMSolverSDEScheduler config it is made as diffusers makes it (its float32 range,
        seeded by its ``noise_sampler_seed``, or torch's global generator without one); otherwise its seed is
        drawn from ``generator``."""
        if self._tree is None:
            from fastdiff.k_diffusion import BrownianTreeNoiseSampler

            levels = [s for s in self._require_schedule().sigmas if s > 0]
            ref = self.config.reference_scheduler
            lo, hi = min(levels), max(levels)
            if ref and ref["class_name"] == "DPMSolverSDEScheduler":
                lo, hi = (float(torch.tensor(v, dtype=torch.float32)) for v in (lo, hi))
                seed = ref["config"].get("noise_sampler_seed")
            else:
                seed = int(torch.randint(0, 2**63 - 1, [], generator=generator))
            self._tree = BrownianTreeNoiseSampler(x, lo, hi, seed=seed)
        return self._tree

    def _noise_times(self, interval: tuple[float, float], i: int) -> tuple[float, float]:
        """Where step ``i`` queries the Brownian path for ``interval``: as diffusers' DPMSolverSDEScheduler does
        when it is the source (float32 ``exp(-t)`` of ``t = -log(sigma)``, the midpoint halfway in ``t``), since
        the tree's increments change with the query points (by 8e-2 at the end of a 7-step Karras run where
        they differ in the last float32 digit); else the interval itself."""
        ref = self.config.reference_scheduler
        if not ref or ref["class_name"] != "DPMSolverSDEScheduler":
            return interval
        sigmas = self._require_schedule().sigmas
        t = -torch.tensor(sigmas[i], dtype=torch.float32).log()
        t_next = -torch.tensor(sigmas[i + 1], dtype=torch.float32).log()
        if not math.isclose(interval[1], sigmas[i + 1], rel_tol=1e-6):  # the first stage's draw, to the midpoint
            t_next = t + (t_next - t) * 0.5
        return float(t.neg().exp()), float(t_next.neg().exp())

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``original_samples`` noised to ``timesteps`` (one per sample, or one for all), in the model's space:
        ``sqrt(ab) x0 + sqrt(1 - ab) noise`` (VP) or ``(1 - t) x0 + t noise`` (flow)."""
        x0 = original_samples
        t = torch.as_tensor(timesteps, device=x0.device).to(torch.float64).reshape(-1)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        if self.prediction == "flow":
            tf = (t / self.config.num_train_timesteps).to(x0.dtype).reshape(shape)
            return (1 - tf) * x0 + tf * noise
        if self._edm is not None:  # EDM timesteps are log(sigma) / 4; the state is x0 + sigma noise
            return x0 + torch.exp(4 * t).to(x0.device, x0.dtype).reshape(shape) * noise
        s = self._grid.t_to_sigma(t.cpu()).to(x0.device, x0.dtype).reshape(shape)
        return (x0 + s * noise) / torch.sqrt(1 + s**2)

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow matching's name and argument order for :meth:`add_noise`."""
        return self.add_noise(sample, noise, timestep)


# ------------------------------------------------------------------------------------------ CoDi adapter


def _unet2d_embed(unet, timesteps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``UNet2DModel``'s time embedding of ``timesteps [B]`` (its forward's step 1, without classes)."""
    t = timesteps.to(x.device) * torch.ones(x.shape[0], dtype=timesteps.dtype, device=x.device)
    return unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))


def _unet2d_encode(unet, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The down blocks and the middle block from ``h = conv_in(x)``: ``(middle output, skips)``."""
    skips = [h]
    for block in unet.down_blocks:
        h, res = block(hidden_states=h, temb=emb)
        skips += list(res)
    if unet.mid_block is not None:
        h = unet.mid_block(h, emb)
    return h, skips


def _unet2d_decode(unet, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
    """The up blocks and the output layers (the forward's steps 5 and 6)."""
    for block in unet.up_blocks:
        n = len(block.resnets)
        h, skips = block(h, tuple(skips[-n:]), emb), skips[:-n]
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


class UNet2DModelAdapter(AdapterBase):
    """CoDi's ControlNet-like adapter (:mod:`fastdiff.train.codi`) for a diffusers ``UNet2DModel``: a copy of its
    ``conv_in``, time embedding, down blocks and middle block, a zero-initialised input convolution for the
    condition, a class embedding of its own (``num_classes`` classes and a null row, when ``num_classes > 0``),
    and the fusion into the adapted UNet's skips and middle output.

    ``forward(unet, sample, timestep, labels, cond)`` returns ``unet``'s output (a tensor) with the adapter fused
    in. The adapted UNet must be unconditional (no class embedding: CoDi distils an unconditional model) and use
    plain down and up blocks with positional time embeddings (not the score-SDE skip blocks or Fourier time).
    """

    def __init__(self, unet, cond_channels: int, num_classes: int = 0, fusion: str = "zero_conv"):
        cfg = unet.config
        if unet.class_embedding is not None:
            raise ValueError("CoDi adapts an unconditional UNet2DModel; this one has a class embedding")
        if cfg.time_embedding_type != "positional" or any(hasattr(b, "skip_conv") for b in unet.down_blocks):
            raise ValueError("the CoDi adapter supports UNet2DModels with positional time embeddings and without "
                             "skip blocks (SkipDownBlock2D, AttnSkipDownBlock2D)")  # fmt: skip
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        with torch.no_grad():
            x = torch.zeros(1, cfg.in_channels, size, size, dtype=unet.dtype, device=unet.device)
            h, skips = _unet2d_encode(unet, unet.conv_in(x), _unet2d_embed(unet, torch.zeros(1), x))
        super().__init__(cond_channels, unet.conv_in.out_channels, [s.shape[1] for s in [*skips, h]], fusion)
        enc = copy.deepcopy(unet)
        enc.up_blocks, enc.conv_norm_out, enc.conv_act, enc.conv_out = torch.nn.ModuleList(), None, None, None
        self.enc, self.num_classes = enc, num_classes
        dim = unet.time_embedding.linear_2.out_features
        self.class_embed = torch.nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, unet, sample: torch.Tensor, timestep, labels, cond) -> torch.Tensor:
        self.check_cond(cond, sample)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        emb = _unet2d_embed(unet, t, sample)
        h, skips = _unet2d_encode(unet, unet.conv_in(sample), emb)
        emb_a = _unet2d_embed(self.enc, t, sample)
        if self.class_embed is not None:
            y = torch.full((sample.shape[0],), -1, device=sample.device) if labels is None else labels.long()
            if sample.device.type == "cpu" and ((y < -1) | (y >= self.num_classes)).any():
                raise ValueError(
                    f"class_labels must lie in [-1, {self.num_classes}), got {sorted(y.unique().tolist())}"
                )
            emb_a = emb_a + self.class_embed(torch.where(y < 0, self.num_classes, y)).to(emb_a.dtype)
        elif labels is not None:
            raise ValueError("this adapter has no class embedding: build it with num_classes > 0")
        ha, skips_a = _unet2d_encode(self.enc, self.add_cond(self.enc.conv_in(sample), cond), emb_a)
        h, skips = self.fuse(h, skips, ha, skips_a)
        return _unet2d_decode(unet, h, skips, emb)


def codi_student(unet, alphas_cumprod: torch.Tensor, prediction: str, condition, fusion: str = "zero_conv",
                 num_classes: int = 0) -> VPDenoiser:  # fmt: skip
    """A CoDi student of the diffusers ``UNet2DModel`` ``unet`` (which predicts ``prediction``: eps, v or x0, on
    the discrete schedule ``alphas_cumprod``): a copy of the UNet plus a :class:`UNet2DModelAdapter`, as a
    fastdiff model ``D(z; sigma, class_labels=None, cond=None)``. At initialisation it equals
    ``VPDenoiser(unet, alphas_cumprod, prediction)``. Train it with :class:`fastdiff.train.codi.CoDiLoss` (its
    ``CoDiConfig.sigma_min``/``sigma_max`` inside the schedule's range) and :func:`fastdiff.train.codi.set_trainable`.
    """
    classes = num_classes if condition.uses_labels else 0
    adapter = UNet2DModelAdapter(unet, condition.channels, classes, fusion)
    student = VPDenoiser(AdaptedNetwork(copy.deepcopy(unet), adapter), alphas_cumprod, prediction)
    student.condition = condition
    return student


def __getattr__(name: str):
    """The pipeline path (:mod:`fastdiff.integrations.diffusers_pipelines`) and the interval guider
    (:mod:`fastdiff.integrations.diffusers_guiders`) are importable from here too (imported on first use, since
    those modules build on this one)."""
    if name in ("PipelineSampler", "sample_pipeline", "FastDiffPipelineOutput"):
        from fastdiff.integrations import diffusers_pipelines

        return getattr(diffusers_pipelines, name)
    if name == "IntervalGuidance":
        from fastdiff.integrations import diffusers_guiders

        return diffusers_guiders.IntervalGuidance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
