"""Real diffusers pipelines built from config, small enough for the CPU suite: SD 1.x, SDXL, SD3, Flux and DiT,
with their text encoders (random weights) and tokenizers made from a vocabulary written here, since no hub is
reachable. Each builder seeds torch, so a pipeline is the same at every build."""

import diffusers
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

WORDS = "a photo of an astronaut riding horse cat dog red blue green house tree car bird sky painting".split()
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)


def clip_tokenizer(max_length: int = 12) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is WORDS (whole-word tokens) plus single letters."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for piece in [*letters, *(c + "</w>" for c in letters), *(w + "</w>" for w in WORDS)]:
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in WORDS:  # merge left to right, so that every word becomes one token
        left = w[0]
        for i, c in enumerate(w[1:], 1):
            right = c + "</w>" if i == len(w) - 1 else c
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 (unigram) tokenizer over WORDS and single letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def clip_text(dim: int = 32, projection: int | None = None, vocab: int = 128):
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=12, projection_dim=projection or dim, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5_text(dim: int = 16):
    cfg = T5Config(vocab_size=64, d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=1, num_heads=2)
    return T5EncoderModel(cfg).eval()


def vae(latent_channels: int = 4, **kwargs) -> diffusers.AutoencoderKL:
    return diffusers.AutoencoderKL(
        block_out_channels=(16,), in_channels=3, out_channels=3, latent_channels=latent_channels, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), **kwargs,
    ).eval()  # fmt: skip


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd(scheduler=None, prediction: str = "epsilon") -> diffusers.StableDiffusionPipeline:
    """SD 1.x/2.x: a cross-attention UNet (16x16 latents), CLIP text encoder, VAE."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    ).eval()  # fmt: skip
    scheduler = scheduler or diffusers.DPMSolverMultistepScheduler(**SD, prediction_type=prediction)
    return _quiet(diffusers.StableDiffusionPipeline(
        vae=vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ))  # fmt: skip


def sdxl(scheduler=None) -> diffusers.StableDiffusionXLPipeline:
    """SDXL: two CLIP encoders (the second with a projection, whose pooled output is ``text_embeds``) and a UNet
    with added ``text_time`` conditioning."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the pooled 32
    )  # fmt: skip
    scheduler = scheduler or diffusers.EulerDiscreteScheduler(**SD)
    return _quiet(diffusers.StableDiffusionXLPipeline(
        vae=vae(), text_encoder=clip_text(32), text_encoder_2=clip_text(32, projection=32), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    ))  # fmt: skip


def sd3(scheduler=None) -> diffusers.StableDiffusion3Pipeline:
    """SD3: an MMDiT over two CLIP encoders (with projections) and a T5 encoder; flow matching with shift 3."""
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
    ).eval()  # fmt: skip
    scheduler = scheduler or diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return _quiet(diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae(shift_factor=0.06),
        text_encoder=clip_text(16, projection=16), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(16, projection=16), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_text(32), tokenizer_3=t5_tokenizer(),
    ))  # fmt: skip


def flux(guidance_embeds: bool = True) -> diffusers.FluxPipeline:
    """FLUX.1: a guidance-distilled MMDiT (guidance as a model input) over packed 2x2 latents, CLIP (pooled) and
    T5 encoders; flow matching with the resolution-dependent shift."""
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 2, 2),
    ).eval()  # fmt: skip
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4,
        max_image_seq_len=64,
    )  # fmt: skip
    return _quiet(diffusers.FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae(4, shift_factor=0.06),
        text_encoder=clip_text(32), tokenizer=clip_tokenizer(), text_encoder_2=t5_text(16), tokenizer_2=t5_tokenizer(),
    ))  # fmt: skip


def dit(scheduler=None, num_layers: int = 1) -> diffusers.DiTPipeline:
    """A class-conditional DiT (ImageNet's 1000 classes plus the null class 1000, learned variance), labelled."""
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip
    scheduler = scheduler or diffusers.DPMSolverMultistepScheduler()
    return _quiet(diffusers.DiTPipeline(
        transformer=transformer, vae=vae(), scheduler=scheduler, id2label={0: "tench, Tinca tinca", 1: "goldfish",
                                                                          207: "golden retriever"},
    ))  # fmt: skip
