"""A diffusers pipeline's network in fastdiff's loop: :class:`PipelineSampler` and the one-shot
:func:`sample_pipeline`.

fastdiff runs the pipeline's UNet or transformer with coefficients on the device, a CUDA graph of the whole loop
if asked for, and interval guidance that skips the unconditional half of the batch outside ``(sigma_lo, sigma_hi]``.
Everything else is done as the pipeline itself does it, by one :class:`Family` per pipeline class:

* prompts are encoded by the pipeline's own ``encode_prompt`` (SD 1.x/2.x, SDXL, SD3, Flux), class names mapped
  by DiT's ``get_label_ids``;
* SDXL's added conditioning (the pooled ``text_embeds`` and the ``time_ids`` of sizes and crops) is built as
  the pipeline builds it;
* Flux's distilled guidance is a network input (no unconditional pass), its latents are packed 2x2 with position
  ids, and its noise levels are the pipeline's ``linspace(1, 1/n, n)`` shifted by the resolution-dependent ``mu``
  (SD3 configs with ``use_dynamic_shifting`` get their ``mu`` the same way);
* latents are drawn with the pipeline's shape and ``randn_tensor``, decoded by its VAE and image processor.

A pipeline of another class (``DDPMPipeline``, an object with a ``unet`` and a ``scheduler``) runs with the
network inputs given as ``cond=``/``uncond=``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import BaseOutput

from fastdiff import schedules
from fastdiff.denoisers import EDMPrecond, FlowDenoiser, VPDenoiser, network_output
from fastdiff.guidance import Guidance
from fastdiff.integrations.diffusers import FastDiffScheduler
from fastdiff.sampler import Sampler

EMBEDDINGS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


class _PipelineNetwork(torch.nn.Module):
    """A pipeline's UNet or transformer as ``net(x_model, t, **cond) -> output``, the form fastdiff's denoiser
    adapters call. SDXL's ``text_embeds``/``time_ids``/``image_embeds`` arrive as flat keyword arguments (so that
    fastdiff can batch them) and go into ``added_cond_kwargs``; ``shared`` holds inputs that are not per sample
    (Flux's position ids); a learned-variance output (DiT: twice the input channels) keeps its first half; the
    input is cast to the network's dtype."""

    ADDED_COND = ("text_embeds", "time_ids", "image_embeds")

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.input_name = "sample" if "sample" in inspect.signature(net.forward).parameters else "hidden_states"
        self.shared: dict[str, Any] = {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        added = {k: cond.pop(k) for k in self.ADDED_COND if k in cond}
        if added:
            cond["added_cond_kwargs"] = added
        # The first parameter's dtype: diffusers' ModelMixin.dtype walks every parameter (about 0.1 ms a call).
        dtype = next(self.net.parameters()).dtype
        with self._cache_context(x.shape[0]):
            out = self.net(**{self.input_name: x.to(dtype)}, timestep=t, return_dict=False, **self.shared, **cond)
        out = network_output(out)
        return out[:, : x.shape[1]] if x.ndim == 4 and out.shape[1] == 2 * x.shape[1] else out

    def _cache_context(self, batch: int):
        """diffusers' own cache hooks (``enable_cache``) keep their state per named context, which its pipelines set
        around each call: one context per batch size here, so that the cond-only calls outside a guidance interval
        and the batched cond+uncond calls inside it each reuse their own state."""
        if getattr(self.net, "is_cache_enabled", False):
            return self.net.cache_context(f"fastdiff-batch-{batch}")
        return contextlib.nullcontext()


class _TransformedDenoiser(torch.nn.Module):
    """``transform(model(x, sigma, **cond))``: a denoiser whose estimates pass through a source scheduler's
    x0 clipping or thresholding."""

    def __init__(self, model: torch.nn.Module, transform):
        super().__init__()
        self.model, self.transform = model, transform
        self.check_sigmas = getattr(model, "check_sigmas", None)  # the sampler's range check of the model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.transform(self.model(x, sigma, **cond))


# ------------------------------------------------------------------------------------------ pipeline families


@dataclass
class Request:
    """One call's conditioning request, as the pipeline's ``__call__`` takes it."""

    prompt: Any
    negative_prompt: Any
    embeddings: dict[str, torch.Tensor]
    options: dict[str, Any]
    guided: bool
    device: torch.device
    height: int
    width: int
    model_guidance: float | None = None


@dataclass
class Conditioning:
    """The network inputs of each pass (per-sample tensors, batch first) and those all samples share."""

    cond: dict[str, Any] = field(default_factory=dict)
    uncond: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)


class Family:
    """How a pipeline class conditions, lays out and decodes its latents. This base serves any pipeline with a
    ``unet`` or ``transformer`` over ``[B, C, h, w]`` latents; its network inputs come as ``cond=``/``uncond=``."""

    pipelines: frozenset[str] = frozenset()  # diffusers pipeline classes (and their subclasses)
    text_parts: tuple[str, ...] = ()  # what encoding a prompt needs
    options: frozenset[str] = frozenset()  # call options besides those of the pipeline's encode_prompt
    flow_time_scale: float | None = None  # a flow network's timestep per unit t (None: num_train_timesteps)
    packed = False  # whether the network's latent layout is not [B, C, h, w]

    @property
    def name(self) -> str:
        return type(self).__name__.removesuffix("Family") or "generic"

    def accepts(self, pipe) -> set[str]:
        """The call options this family takes for ``pipe``: its own and those of ``pipe.encode_prompt``."""
        encode = getattr(pipe, "encode_prompt", None)
        if not self.text_parts or encode is None:
            return set(self.options)
        drop = {"self", "prompt", "negative_prompt", "device", "num_images_per_prompt", "do_classifier_free_guidance",
                "lora_scale", *EMBEDDINGS}  # fmt: skip
        return set(self.options) | (set(inspect.signature(encode).parameters) - drop)

    def conditioning(self, pipe, req: Request) -> Conditioning:
        if req.prompt is not None or req.negative_prompt is not None or req.embeddings:
            raise ValueError(f"{type(pipe).__name__}: prompts and text embeddings are supported for "
                             f"{', '.join(sorted(n for f in FAMILIES for n in f.pipelines))}; give this "
                             "pipeline's network inputs as cond= and uncond=")  # fmt: skip
        return Conditioning()

    def _encode(self, pipe, req: Request) -> tuple:
        """``pipe.encode_prompt`` with the request's prompts, embeddings and options (one image per prompt; the
        sampler repeats them), after checking that what it needs is there."""
        if req.prompt is not None or req.negative_prompt is not None:
            missing = [p for p in self.text_parts if getattr(pipe, p, None) is None]
            if missing:
                raise ValueError(f"{type(pipe).__name__} has no {' or '.join(missing)}: pass prompt_embeds "
                                 "(and the pipeline's other embeddings) instead of a prompt")  # fmt: skip
        params = inspect.signature(pipe.encode_prompt).parameters
        kwargs = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, device=req.device,
                      num_images_per_prompt=1, do_classifier_free_guidance=req.guided, **req.embeddings)  # fmt: skip
        kwargs.update((k, v) for k, v in req.options.items() if k in params)
        kwargs.update((k, None) for k, p in params.items() if p.default is p.empty and k != "self" and k not in kwargs)
        return pipe.encode_prompt(**{k: v for k, v in kwargs.items() if k in params})

    def image_size(self, pipe, net, height: int | None, width: int | None) -> tuple[int, int]:
        """The image size in pixels: given, or the pipeline's default."""
        size = net.config.sample_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        scale = self.vae_scale(pipe)
        return (size[0] * scale if height is None else height, size[1] * scale if width is None else width)

    @staticmethod
    def vae_scale(pipe) -> int:
        return getattr(pipe, "vae_scale_factor", 1) if getattr(pipe, "vae", None) is not None else 1

    def latent_shape(self, pipe, net, batch: int, height: int, width: int) -> tuple[int, ...]:
        """``[B, C, h, w]`` of the noise the pipeline draws for an image of ``height x width`` pixels."""
        scale = self.vae_scale(pipe)
        return (batch, net.config.in_channels, height // scale, width // scale)

    def pack(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Drawn noise to the network's latent layout."""
        return latents

    def unpack(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The network's latent layout to ``[B, C, h, w]`` for the VAE."""
        return latents

    def timestep_options(self, pipe, net, steps: int | None, height: int, width: int) -> dict:
        """What the pipeline passes its scheduler's ``set_timesteps`` besides the number of steps."""
        return {}

    def model_guidance(self, net, guidance) -> tuple[Guidance | float | None, float | None]:
        """``(guidance for fastdiff's loop, guidance as a network input)``."""
        return guidance, None


def _text_conditioning(guided: bool, cond: dict, uncond: dict) -> Conditioning:
    return Conditioning(cond, uncond if guided else {})


class StableDiffusionFamily(Family):
    """SD 1.x/2.x: CLIP hidden states as ``encoder_hidden_states``."""

    pipelines = frozenset({"StableDiffusionPipeline"})
    text_parts = ("tokenizer", "text_encoder")

    def conditioning(self, pipe, req: Request) -> Conditioning:
        _refuse_guidance_embedding(pipe.unet)
        if req.prompt is None and "prompt_embeds" not in req.embeddings:
            return super().conditioning(pipe, req)
        if (
            req.guided
            and req.negative_prompt is None
            and "negative_prompt_embeds" not in req.embeddings
            and (getattr(pipe, "tokenizer", None) is None)
        ):
            raise ValueError("guidance needs negative_prompt_embeds (the unconditional pass's text embeddings), or "
                             "a pipeline with a tokenizer and text encoder to encode the empty prompt")  # fmt: skip
        pe, ne = self._encode(pipe, req)
        return _text_conditioning(req.guided, {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne})


class StableDiffusionXLFamily(Family):
    """SDXL: the two CLIP encoders' hidden states, and the added conditioning: the second encoder's pooled
    projection (``text_embeds``) and ``time_ids`` (original size, crop corner, target size)."""

    pipelines = frozenset({"StableDiffusionXLPipeline"})
    text_parts = ("tokenizer_2", "text_encoder_2")
    options = frozenset({"original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                         "negative_crops_coords_top_left", "negative_target_size"})  # fmt: skip

    def conditioning(self, pipe, req: Request) -> Conditioning:
        _refuse_guidance_embedding(pipe.unet)
        pe, ne, pooled, neg_pooled = self._encode(pipe, req)
        enc2 = getattr(pipe, "text_encoder_2", None)
        proj = int(pooled.shape[-1]) if enc2 is None else enc2.config.projection_dim
        o = req.options
        size = (req.height, req.width)

        def time_ids(original, crop, target):
            ids = pipe._get_add_time_ids(original or size, crop or (0, 0), target or size, dtype=pe.dtype,
                                         text_encoder_projection_dim=proj)  # fmt: skip
            return ids.to(req.device).repeat(pe.shape[0], 1)

        ids = time_ids(o.get("original_size"), o.get("crops_coords_top_left"), o.get("target_size"))
        neg_ids = ids  # the pipeline's rule: other negative ids only when both negative sizes are given
        if o.get("negative_original_size") is not None and o.get("negative_target_size") is not None:
            neg_ids = time_ids(o["negative_original_size"], o.get("negative_crops_coords_top_left"),
                               o["negative_target_size"])  # fmt: skip
        return _text_conditioning(
            req.guided,
            {"encoder_hidden_states": pe, "text_embeds": pooled, "time_ids": ids},
            {"encoder_hidden_states": ne, "text_embeds": neg_pooled, "time_ids": neg_ids},
        )


class StableDiffusion3Family(Family):
    """SD3: the joint CLIP+T5 hidden states and the pooled CLIP projections (``pooled_projections``)."""

    pipelines = frozenset({"StableDiffusion3Pipeline"})
    text_parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

    def conditioning(self, pipe, req: Request) -> Conditioning:
        pe, ne, pooled, neg_pooled = self._encode(pipe, req)
        return _text_conditioning(
            req.guided,
            {"encoder_hidden_states": pe, "pooled_projections": pooled},
            {"encoder_hidden_states": ne, "pooled_projections": neg_pooled},
        )

    def timestep_options(self, pipe, net, steps, height, width) -> dict:
        cfg = pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return {}
        p, scale = net.config.patch_size, self.vae_scale(pipe)
        tokens = (height // scale // p) * (width // scale // p)
        return {"mu": _shift_mu(cfg, tokens, max_shift=1.16)}


def _shift_mu(cfg: Mapping, tokens: int, max_shift: float) -> float:
    """A pipeline's resolution-dependent shift from its scheduler config (the pipeline's fallbacks otherwise)."""
    return schedules.dynamic_shift_mu(
        tokens, cfg.get("base_shift", 0.5), cfg.get("max_shift", max_shift), cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
    )  # fmt: skip


class FluxFamily(Family):
    """FLUX.1: CLIP's pooled output and T5's hidden states, guidance distilled into a network input (no
    unconditional pass), latents packed in 2x2 patches with position ids, and the pipeline's noise levels."""

    pipelines = frozenset({"FluxPipeline"})
    text_parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    flow_time_scale = 1.0  # the pipeline passes timestep / 1000
    packed = True
    DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale

    def conditioning(self, pipe, req: Request) -> Conditioning:
        given = {"negative_prompt": req.negative_prompt, **req.embeddings}
        negative = [k for k in ("negative_prompt", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
                    if given.get(k) is not None]  # fmt: skip
        if negative:
            raise ValueError(f"FluxPipeline: {negative[0]} is not used: FLUX.1's guidance is distilled into the "
                             "network (guidance=), with no unconditional pass")  # fmt: skip
        pe, pooled, text_ids = self._encode(pipe, req)
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        if req.model_guidance is not None:
            cond["guidance"] = torch.full((pe.shape[0],), req.model_guidance, device=req.device, dtype=torch.float32)
        _, c, h, w = self.latent_shape(pipe, pipe.transformer, 1, req.height, req.width)
        img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, req.device, pe.dtype)
        return Conditioning(cond, {}, {"txt_ids": text_ids, "img_ids": img_ids})

    def image_size(self, pipe, net, height, width) -> tuple[int, int]:
        default = pipe.default_sample_size * self.vae_scale(pipe)
        return (default if height is None else height, default if width is None else width)

    def latent_shape(self, pipe, net, batch, height, width) -> tuple[int, ...]:
        s = 2 * self.vae_scale(pipe)
        return (batch, net.config.in_channels // 4, 2 * (height // s), 2 * (width // s))

    def pack(self, pipe, latents):
        b, c, h, w = latents.shape
        return pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, pipe, latents, height, width):
        return pipe._unpack_latents(latents, height, width, self.vae_scale(pipe))

    def timestep_options(self, pipe, net, steps, height, width) -> dict:
        cfg = pipe.scheduler.config
        _, _, h, w = self.latent_shape(pipe, net, 1, height, width)
        options = {"mu": _shift_mu(cfg, (h // 2) * (w // 2), max_shift=1.15)}
        if steps is not None and not cfg.get("use_flow_sigmas", False):
            options["sigmas"] = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64).tolist()
        return options

    def model_guidance(self, net, guidance):
        scale = guidance
        if isinstance(guidance, Guidance):
            if guidance.interval is not None or guidance.steps is not None or guidance.uncond_model is not None:
                raise ValueError("FLUX.1's guidance is a network input (distilled guidance), not a second pass: "
                                 "it takes a scale, with no interval, steps or unconditional model")  # fmt: skip
            scale = guidance.scale
        if not net.config.guidance_embeds:
            if scale is not None and float(scale) != 1:
                raise ValueError("this FLUX transformer has no guidance input (guidance_embeds=False, as "
                                 "FLUX.1-schnell); leave guidance=None")  # fmt: skip
            return None, None
        return None, self.DEFAULT_GUIDANCE if scale is None else float(scale)


class DiTFamily(Family):
    """A class-conditional DiT: ``class_labels``, with the null class (the label embedding's extra row) for the
    unconditional pass. Prompts are class ids or names from the pipeline's ``id2label``."""

    pipelines = frozenset({"DiTPipeline"})

    def conditioning(self, pipe, req: Request) -> Conditioning:
        if req.negative_prompt is not None or req.embeddings:
            raise ValueError("DiTPipeline takes class labels as prompt=; its unconditional pass is the null class, "
                             "so negative_prompt and text embeddings do not apply")  # fmt: skip
        if req.prompt is None:
            return Conditioning()
        prompt = [req.prompt] if isinstance(req.prompt, (str, int)) else list(req.prompt)
        prompt = [int(p) if isinstance(p, str) and p.strip().isdigit() else p for p in prompt]  # "207": an id
        names = [p for p in prompt if isinstance(p, str)]
        ids = iter(pipe.get_label_ids(names) if names else [])
        labels = torch.tensor([next(ids) if isinstance(p, str) else int(p) for p in prompt], device=req.device)
        null = torch.full_like(labels, pipe.transformer.config.num_embeds_ada_norm)
        return _text_conditioning(req.guided, {"class_labels": labels}, {"class_labels": null})


def _refuse_guidance_embedding(unet) -> None:
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise ValueError("this UNet takes a guidance-scale embedding (time_cond_proj_dim: an LCM-distilled UNet), "
                         "which the pipeline path does not yet pass; use FastDiffScheduler in the pipeline's own "
                         "loop")  # fmt: skip


FAMILIES = (StableDiffusionFamily(), StableDiffusionXLFamily(), StableDiffusion3Family(), FluxFamily(), DiTFamily())


def family_of(pipe) -> Family:
    """The :class:`Family` of ``pipe``'s class (or of a class it derives from); :class:`Family` itself for
    others."""
    names = {c.__name__ for c in type(pipe).__mro__}
    return next((f for f in FAMILIES if f.pipelines & names), Family())


# ------------------------------------------------------------------------------------------ the sampler


@dataclass
class FastDiffPipelineOutput(BaseOutput):
    """``images``: decoded images in the pipeline's ``output_type`` (PIL list, numpy array or tensor), or the
    final latents (in the network's layout: ``[B, C, h, w]``, Flux's packed ``[B, h w / 4, 4 C]``) with
    ``output_type="latent"`` or without a VAE. ``nfe``: ``(conditional, unconditional)`` network evaluations spent
    (a batched cond+uncond call counts in both)."""

    images: Any
    nfe: tuple[int, int]


class PipelineSampler:
    """A diffusers pipeline's network run by fastdiff's loop (:class:`fastdiff.Sampler`), built once for an image
    size and called many times (a captured CUDA graph is kept between calls).

    Args:
        pipe: a diffusers pipeline with a ``unet`` or ``transformer``, a ``scheduler`` (its config gives the
            training noise schedule, the prediction type and the default noise levels, as for
            :class:`FastDiffScheduler`) and optionally a ``vae``. SD 1.x/2.x, SDXL, SD3, Flux and DiT pipelines
            take prompts; others take their network's inputs as ``cond=``/``uncond=``.
        solver, steps: the fastdiff solver and its number of steps.
        guidance: a guidance scale (ordinary CFG at every step; 1 or None for none) or a :class:`fastdiff.Guidance`,
            e.g. ``Guidance(7.5, interval=(0.28, 5.4))``: outside the interval the unconditional pass is not run.
            For a guidance-distilled Flux transformer it is the network's guidance input (default 3.5).
        schedule, schedule_options, learned_schedule, sigmas: the noise levels, as for :class:`FastDiffScheduler`
            (``sigmas``: custom ones in the scheduler's convention). By default those the pipeline asks its
            scheduler for (Flux: ``linspace(1, 1/n, n)`` with the shift ``mu`` of this image size).
        height, width: the image size in pixels (default: the pipeline's).
        cuda_graph, compile, cache: see :class:`fastdiff.Sampler` (``cache``: a :mod:`fastdiff.cache` feature cache
            of the UNet, or of a DiT transformer).
    """

    def __init__(
        self,
        pipe,
        *,
        solver: str = "dpmpp_2m",
        steps: int | None = 20,
        guidance: float | Guidance | None = None,
        schedule: str | None = None,
        schedule_options: dict | None = None,
        learned_schedule: str | None = None,
        sigmas: Sequence[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        cuda_graph: bool = False,
        compile: bool | dict = False,
        cache=None,
    ):
        net = getattr(pipe, "unet", None)
        net = getattr(pipe, "transformer", None) if net is None else net
        if net is None:
            raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer to sample")
        self.pipe, self.network, self.family = pipe, net, family_of(pipe)
        self.height, self.width = self.family.image_size(pipe, net, height, width)
        sched = FastDiffScheduler.from_config(
            pipe.scheduler.config, solver=solver, schedule=schedule, schedule_options=schedule_options,
            learned_schedule=learned_schedule,
        )  # fmt: skip
        if sched._edm is not None and sched.prediction != "eps":
            raise ValueError("the pipeline path runs EDM-preconditioned networks that predict epsilon; for "
                             "v_prediction use FastDiffScheduler in the pipeline's own loop")  # fmt: skip
        if hasattr(guidance, "to_guidance"):  # a diffusers guider of fastdiff's (IntervalGuidance)
            guidance = guidance.to_guidance()
        guidance, self.model_guidance = self.family.model_guidance(net, guidance)
        if guidance is not None and not isinstance(guidance, Guidance):
            guidance = Guidance(float(guidance))
        guided = guidance is not None and float(guidance.scale) != 1
        if sched._x0_transform is not None and guided:
            # Clipping is not linear in the guided estimate, which fastdiff's loop forms inside the fused step.
            raise ValueError(f"{type(pipe.scheduler).__name__}'s clip_sample/thresholding (a clamp of the guided x0 "
                             "estimate) is not available in fastdiff's guided loop; use FastDiffScheduler in the "
                             "pipeline's own loop, or a scheduler config with clip_sample=False, "
                             "thresholding=False")  # fmt: skip
        own = learned_schedule is None and schedule is None
        request = self.family.timestep_options(pipe, net, steps, self.height, self.width) if own else {}
        if sigmas is not None:
            request["sigmas"] = sigmas
        sched.set_timesteps(None if learned_schedule is not None or sigmas is not None else steps, **request)
        # Latents of another size than the one the sampler was built for: fine, unless the noise levels (a
        # resolution-dependent shift) or the network's inputs (Flux's position ids) were made for that size.
        self._size_bound = self.family.packed or "mu" in request
        self.scheduler = sched
        self._network = _PipelineNetwork(net)
        if sched._edm is not None:  # diffusers' EDM schedulers: c_in x, timestep log(sigma) / 4, c_skip x + c_out F
            model = EDMPrecond(self._network, sched._edm.sigma_data)
        elif sched.prediction == "flow":
            scale = self.family.flow_time_scale or sched.config.num_train_timesteps
            model = FlowDenoiser(self._network, time_scale=scale)
        else:
            model = VPDenoiser(self._network, sched.alphas_cumprod, prediction=sched.prediction)
        if sched._x0_transform is not None:  # unguided: the scheduler's clamp of each estimate
            model = _TransformedDenoiser(model, sched._x0_transform)
        self.model, self.guidance = model, guidance
        self.sigmas = torch.tensor(sched._schedule.sigmas, dtype=torch.float64)
        self.sampler = Sampler(
            model, solver=sched.solver, sigmas=self.sigmas, guidance=guidance, cuda_graph=cuda_graph,
            compile=compile, eval_sigmas=torch.tensor(sched._schedule.model_sigmas, dtype=torch.float64), cache=cache,
        )  # fmt: skip

    @property
    def guided(self) -> bool:
        return any(self.sampler.plan.guided)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of the initial latents in the network's layout (the pipeline's ``latents=`` argument)."""
        drawn = self.family.latent_shape(self.pipe, self.network, batch, self.height, self.width)
        return tuple(self.family.pack(self.pipe, torch.empty(drawn, device="meta")).shape)

    @torch.no_grad()
    def conditioning(
        self,
        prompt: str | Sequence | None = None,
        negative_prompt: str | Sequence | None = None,
        *,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        num_images_per_prompt: int = 1,
        **options,
    ) -> Conditioning:
        """The network inputs of each pass for these prompts (or embeddings, under the pipeline's argument names
        ``prompt_embeds``, ``negative_prompt_embeds``, ``pooled_prompt_embeds``, ...), with ``cond``/``uncond``
        added, every per-sample tensor repeated ``num_images_per_prompt`` times."""
        if isinstance(prompt, torch.Tensor) or isinstance(negative_prompt, torch.Tensor):
            raise TypeError("prompt and negative_prompt are text (or DiT class labels); pass text embeddings as "
                            "prompt_embeds= and negative_prompt_embeds=")  # fmt: skip
        embeddings = {k: options.pop(k) for k in EMBEDDINGS if options.get(k) is not None}
        for k in EMBEDDINGS:
            options.pop(k, None)
        unknown = sorted(set(options) - self.family.accepts(self.pipe))
        if unknown:
            raise TypeError(f"{type(self.pipe).__name__}: unknown option {unknown[0]!r}; this pipeline takes "
                            f"{sorted(self.family.accepts(self.pipe)) or 'no options'}")  # fmt: skip
        req = Request(prompt, negative_prompt, embeddings, options, self.guided, self.network.device, self.height,
                      self.width, self.model_guidance)  # fmt: skip
        c = self.family.conditioning(self.pipe, req)
        c.cond.update(cond or {})
        c.uncond.update(uncond or {})
        if self.guided and "encoder_hidden_states" in c.cond and "encoder_hidden_states" not in c.uncond:
            raise ValueError("guidance needs negative_prompt_embeds (the unconditional pass's text embeddings)")
        n = num_images_per_prompt
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {n!r}")
        for d in (c.cond, c.uncond):
            d.update((k, v.repeat_interleave(n, 0)) for k, v in d.items() if isinstance(v, torch.Tensor) and v.ndim)
        return c

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence | None = None,
        negative_prompt: str | Sequence | None = None,
        *,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        **options,
    ) -> FastDiffPipelineOutput:
        """Sample, and decode if the pipeline has a VAE.

        Args:
            prompt, negative_prompt: as the pipeline's ``__call__`` takes them (a string or a list; DiT: class ids
                or names). Without a negative prompt under guidance the pipeline's own default is used (the
                empty prompt; SDXL's zeros with ``force_zeros_for_empty_prompt``).
            cond, uncond: further network keyword arguments of each pass, e.g. ``{"class_labels": y}`` for a
                ``UNet2DModel`` (batch-first tensors).
            latents: initial latents in the pipeline's convention (unit-variance noise, in the network's layout);
                by default drawn as the pipeline draws them, with ``generator``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            options: the pipeline's other prompt arguments under its names: embeddings (``prompt_embeds``,
                ``negative_prompt_embeds``, ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``), and
                ``prompt_2``, ``clip_skip``, ``max_sequence_length``, SDXL's ``original_size``, ... where the
                pipeline takes them.
        """
        c = self.conditioning(prompt, negative_prompt, cond=cond, uncond=uncond,
                              num_images_per_prompt=num_images_per_prompt, **options)  # fmt: skip
        batch = next((v.shape[0] for v in c.cond.values() if isinstance(v, torch.Tensor) and v.ndim),
                     num_images_per_prompt)  # fmt: skip
        device = self.network.device
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            drawn = self.family.latent_shape(self.pipe, self.network, batch, self.height, self.width)
            latents = self.family.pack(self.pipe, randn_tensor(drawn, generator=generator, device=device))
        elif latents.shape[0] != batch or self._size_bound and tuple(latents.shape) != self.latent_shape(batch):
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this sampler's batch of {batch} at "
                             f"{self.height}x{self.width} needs {self.latent_shape(batch)}")  # fmt: skip
        start = self.scheduler.init_noise_sigma * self.scheduler._scale(float(self.sigmas[0]))
        x = latents.to(device, torch.float32) * start
        self._network.shared = c.shared
        try:
            z = self.sampler.sample(x, c.cond, c.uncond or None)
        finally:
            self._network.shared = {}
        return FastDiffPipelineOutput(self.decode(z, output_type), self.sampler.nfe)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Final latents to images as the pipeline decodes them (or the latents themselves)."""
        if output_type == "latent" or getattr(self.pipe, "vae", None) is None:
            return latents
        image = self.decode_latents(latents)
        processor = getattr(self.pipe, "image_processor", None)
        if processor is None:
            from diffusers.image_processor import VaeImageProcessor

            processor = VaeImageProcessor()
        return processor.postprocess(image, output_type=output_type)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's images ``[B, 3, H, W]`` (about [-1, 1], before the pipeline's postprocessing) of latents in
        the network's layout; differentiable (LD3's decoded metric)."""
        vae = self.pipe.vae
        z = self.family.unpack(self.pipe, latents, self.height, self.width)
        cfg = vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
            if getattr(cfg, "shift_factor", None) is not None:
                z = z + cfg.shift_factor
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]


def sample_pipeline(
    pipe,
    prompt: str | Sequence | None = None,
    negative_prompt: str | Sequence | None = None,
    *,
    guidance: float | Guidance | None = None,
    solver: str = "dpmpp_2m",
    steps: int = 20,
    **kwargs,
) -> FastDiffPipelineOutput:
    """One call of :class:`PipelineSampler`: build it for ``pipe`` (``solver``, ``steps``, ``guidance``, the
    image size and the schedule options from ``kwargs``), then sample (the call's arguments from ``kwargs``)::

        out = sample_pipeline(pipe, "a photo of an astronaut", guidance=Guidance(7.5, interval=(0.28, 5.42)))
    """
    build = set(inspect.signature(PipelineSampler.__init__).parameters) - {"self", "pipe"}
    runner = PipelineSampler(
        pipe, solver=solver, steps=steps, guidance=guidance, **{k: v for k, v in kwargs.items() if k in build}
    )
    call = {k: v for k, v in kwargs.items() if k not in build}
    return runner(prompt, negative_prompt, **call)
