"""training.cost: the FLOP counts on hand-computed small cases, the real towers' sizes, device kinds, hours."""

import pytest

from training.cost import (
    DEVICES,
    TEXT_TOWERS,
    VISION_TOWERS,
    device_kind,
    encoder_dims,
    gpu_hours,
    objective_train_flops_per_sample,
    peak_flops,
    prior_train_flops_per_sample,
    text_flops_per_caption,
    vision_flops_per_image,
)
from training.prior import PRIOR_PRESETS, preset_config

TOY_PRIOR = dict(embedding_dim=4, num_attention_heads=1, attention_head_dim=2, num_embeddings=3,
                 additional_embeddings=3, num_layers=1)
TOY_VISION = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, patch_size=2, image_size=4, projection_dim=3)
TOY_TEXT = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, projection_dim=3, max_position_embeddings=3)


def test_prior_flops_by_hand():
    # D 4, inner 2, 3 text + 3 extra = 6 positions, MLP 8, one layer:
    # text proj 2*3*4*2 = 48; embed + noise proj 2*2*4*2 = 32; block 2*6*(4*2*2 + 2*2*8) = 576 and
    # attention 2*2*6*6*2 = 288; output 2*2*4 = 16 -> forward 960; training 3x = 2880.
    assert prior_train_flops_per_sample(TOY_PRIOR) == 2880


def test_vision_and_text_flops_by_hand():
    # 4 patches (+1 class token = 5): patch embedding 2*4*(3*2*2)*4 = 384; block 2*5*(4*16 + 2*4*8) = 1280,
    # attention 2*2*25*4 = 400; projection 2*4*3 = 24 -> 2088.
    assert vision_flops_per_image(TOY_VISION) == 2088
    # 3 positions: block 2*3*128 = 768, attention 2*2*9*4 = 144, projection 24 -> 936; at 2 positions 2*2*128 + 64 + 24.
    assert text_flops_per_caption(TOY_TEXT) == 936
    assert text_flops_per_caption(TOY_TEXT, tokens=2) == 512 + 64 + 24


def test_real_towers_and_priors_match_the_benchmarked_figures():
    # BENCHMARKS.md (cache speed-up at the real pair's ratio): bigG/14 967 GFLOP per image, the prior 15.8 per sample
    assert vision_flops_per_image(VISION_TOWERS["kandinsky22"]) / 1e9 == pytest.approx(967.5, abs=0.1)
    assert objective_train_flops_per_sample("kandinsky22", "eclipse") / 1e9 == pytest.approx(15.81, abs=0.01)
    assert vision_flops_per_image(VISION_TOWERS["karlo"]) / 1e9 == pytest.approx(162.0, abs=0.1)  # ViT-L/14
    # the diffusion baseline's prior has one more position, so costs a little more; projection == eclipse
    for preset in ("kandinsky22", "karlo"):
        eclipse = objective_train_flops_per_sample(preset, "eclipse")
        assert objective_train_flops_per_sample(preset, "projection") == eclipse
        assert 1.0 < objective_train_flops_per_sample(preset, "diffusion") / eclipse < 1.02


def test_encoder_dims_are_the_prior_presets_d():
    for decoder in VISION_TOWERS:
        dim, hidden = encoder_dims(decoder)
        assert dim == PRIOR_PRESETS[decoder]["embedding_dim"] == TEXT_TOWERS[decoder]["projection_dim"]
        assert hidden == TEXT_TOWERS[decoder]["hidden_size"]
        assert TEXT_TOWERS[decoder]["max_position_embeddings"] == preset_config(decoder)["num_embeddings"]


def test_device_kinds_by_key_and_by_cuda_name():
    assert device_kind("a6000").peak_bf16 == 154.8e12 and device_kind("A100").name == "a100"
    assert device_kind("NVIDIA RTX A6000").name == "a6000"
    assert device_kind("NVIDIA H100 NVL").name == "h100-nvl" and device_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert device_kind("NVIDIA GH200 480GB").name == "gh200" and device_kind("NVIDIA L40S").name == "l40s"
    assert device_kind("NVIDIA L4").name == "l4"
    assert peak_flops("Some GPU") is None and peak_flops("Some GPU", 100) == 100e12
    with pytest.raises(ValueError, match="unknown device kind"):
        device_kind("tpu")
    assert all("datasheet" in k.source and 0 < k.prior_mfu < 1 for k in DEVICES.values())


def test_gpu_hours():
    assert gpu_hours(3.6e15, 1e12, 0.5) == pytest.approx(2.0)
