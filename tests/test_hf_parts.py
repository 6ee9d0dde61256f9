"""pipeline.hf_parts: loading one part of a transformers encoder fails with a message that names the part."""

import json
from pathlib import Path

import pytest

from pipeline.encoders import load_encoder, save_encoder
from pipeline.errors import EncoderLoadError
from pipeline.families import TEXT_ENCODER, Part
from pipeline.hf_parts import HUB_PRESETS


def test_hub_presets_name_every_part() -> None:
    assert set(HUB_PRESETS) == {"kandinsky22", "karlo"}
    assert HUB_PRESETS["karlo"].text_encoder == Part("kakaobrain/karlo-v1-alpha", TEXT_ENCODER)
    assert Part("org/repo", "text_encoder").label == "org/repo/text_encoder" and Part("org/repo").kwargs() == {}


def test_size_mismatch_names_the_config_key(tmp_path: Path) -> None:
    # A saved encoder folder whose text tower config no longer fits its weights.
    save_encoder(load_encoder("tiny-clip", device="cpu"), tmp_path / "enc")
    cfg_path = tmp_path / "enc" / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["projection_dim"] = 20  # the weights project to 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(EncoderLoadError) as e:
        load_encoder(tmp_path / "enc", device="cpu")
    msg = str(e.value)
    assert "text encoder" in msg and str(tmp_path / "enc") in msg and "size mismatch" in msg
    assert "`projection_dim`" in msg and "projection_dim=20" in msg and "hidden_size=32" in msg
