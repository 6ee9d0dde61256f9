"""Tiny random models of the real classes, saved like downloaded weights: stand-ins for decoders and image
scorers in tests (nothing is downloaded)."""

import os
from pathlib import Path

import torch

from evaluation.decoders import DECODERS


def build_tiny_decoder(kind: str, path: str | os.PathLike, embedding_dim: int = 32, seed: int = 0) -> Path:
    """A tiny random decoder of the real pipeline classes, saved with save_pretrained (configs as in
    diffusers' own pipeline tests). Kandinsky: UNet (image_proj of D) + MoVQ, 64 px out; Karlo: text
    encoder + text_proj + decoder (32 px) + super-resolution UNets (64 px) + a small prior (Karlo's
    layout has one; Decoder.load never loads it)."""
    from diffusers import DDPMScheduler, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel, VQModel

    out = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "kandinsky22":
            from diffusers import KandinskyV22Pipeline

            unet = UNet2DConditionModel(
                in_channels=4, out_channels=8, addition_embed_type="image",
                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
                encoder_hid_dim=embedding_dim, encoder_hid_dim_type="image_proj", cross_attention_dim=32,
                attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None,
            )
            movq = VQModel(
                block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                vq_embed_dim=4,
            )
            scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                      beta_end=0.012, clip_sample=False, steps_offset=1, prediction_type="epsilon")
            KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(out)
        elif kind == "karlo":
            from diffusers import PriorTransformer, UnCLIPPipeline
            from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            from pipeline.encoders import build_tiny_tokenizer

            tok = build_tiny_tokenizer()
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(tok), hidden_size=embedding_dim, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=embedding_dim,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ))
            prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=embedding_dim,
                                     num_layers=1)
            text_proj = UnCLIPTextProjModel(clip_embeddings_dim=embedding_dim, time_embed_dim=128,
                                            cross_attention_dim=100)
            decoder = UNet2DConditionModel(
                sample_size=32, in_channels=3, out_channels=6,
                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
                cross_attention_dim=100, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
                class_embed_type="identity",
            )
            sr = dict(sample_size=64, layers_per_block=1, block_out_channels=(32, 64), in_channels=6, out_channels=3,
                      down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                      up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"))
            super_res_first = UNet2DModel(**sr)
            super_res_last = UNet2DModel(**sr)
            UnCLIPPipeline(
                prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tok, text_proj=text_proj,
                super_res_first=super_res_first, super_res_last=super_res_last,
                prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                                num_train_timesteps=1000, clip_sample_range=5.0),
                decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                                  num_train_timesteps=1000),
                super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                                    num_train_timesteps=1000),
            ).save_pretrained(out)
        else:
            raise ValueError(f"unknown decoder {kind!r}; choose one of {list(DECODERS)}")
    return out


def save_tiny_clip_scorer(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random CLIPModel + processor folder: stands in for CLIPScore/PickScore weights in tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipeline.encoders import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    out = Path(path)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(out)
    return out
