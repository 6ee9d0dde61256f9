"""The decoder families' registry: a made-up family, registered in one place, goes through every layer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.families import DEFAULT_FAMILY, FAMILIES, family, register_family

ROOT = Path(__file__).resolve().parents[1]

# Registered before anything else is imported (the layers derive their tables at import), as a launcher would.
SCRIPT = r"""
import json, sys
from pathlib import Path
from pipeline.families import DecoderFamily, HFLayout, Part, register_family
enc, dec, tmp = (Path(a) for a in sys.argv[1:4])
register_family(DecoderFamily(
    name="tinydec", title="tiny test decoder", tower="ViT-T/8",
    encoder=HFLayout(Part(str(enc), "image_encoder"), Part(str(enc), "image_processor"),
                     Part(str(enc), "text_encoder"), Part(str(enc), "tokenizer")),
    embedding_dim=32,
    vision_tower=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                      image_size=32, projection_dim=32, hidden_act="gelu"),
    text_tower=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32, max_position_embeddings=77),
    decoder_repo=str(dec), pipeline="kandinsky",
    sampling={"steps": 2, "guidance_scale": 4.0, "height": 64, "width": 64},
    paper_datasets=("mscoco",), deploy_datasets=("cc3m",),
    prior=dict(num_attention_heads=2, attention_head_dim=16, num_layers=2),
))

from cli.main import build_parser
from evaluation.generate import generate
from flows.params import DATASET_DEPLOYMENTS, DECODER_STORES
from flows.reproduce import ReproduceParams
from pipeline.encode import EncodeConfig, encode_shard
from training.config import TrainConfig
from training.plan import PlanConfig, plan_dict
from training.trainer import train
from wdsfixtures import good_shard

out = {}
out["cli"] = build_parser().parse_args(["reproduce", "--decoders", "tinydec"]).decoders
out["deployments"] = [DATASET_DEPLOYMENTS.get("cc3m-tinydec"), DECODER_STORES.get("tinydec")]
out["grid"] = ReproduceParams(datasets=["mscoco"], decoders=["tinydec"]).decoders
plan = plan_dict(PlanConfig(datasets=("mscoco",), decoders=("tinydec",)))
out["plan"] = [t["decoder"] for t in plan["train"]]
tar = good_shard(tmp / "img" / "00000.tar", 0, 8)
encode_shard(tar, tmp / "store", EncodeConfig(encoder="tinydec", batch_size=4))  # the family's encoder preset
prior = train(TrainConfig(store=str(tmp / "store"), out=str(tmp / "run"), objective="projection", steps=2,
                          batch_size=4, heldout_fraction=0.0, num_threads=1, progress=False, eval_every=0))
out["preset"] = json.loads((tmp / "run" / "train_config.json").read_text())["preset"]
image = generate("a red car", prior, device="cpu", steps=2)  # the decoder: the family of the prior's encoder
out["image"] = list(image.size)
print("RESULT", json.dumps(out))
"""


def test_the_registry_holds_the_released_families():
    assert list(FAMILIES) == ["kandinsky22", "karlo"] and DEFAULT_FAMILY in FAMILIES
    assert (family("kandinsky22").embedding_dim, family("karlo").embedding_dim) == (1280, 768)
    with pytest.raises(ValueError, match="already registered"):
        register_family(FAMILIES["karlo"])
    with pytest.raises(ValueError, match="unknown decoder family 'dalle2'"):
        family("dalle2")


@pytest.mark.slow
def test_a_family_registered_in_one_place_runs_plan_encode_train_and_generate(tmp_path):
    from tinymodels import build_tiny_decoder

    from pipeline.encoders import load_encoder, save_encoder

    enc = save_encoder(load_encoder("tiny-clip", device="cpu"), tmp_path / "encoder")
    dec = build_tiny_decoder("kandinsky22", tmp_path / "decoder", 32)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(enc), str(dec), str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert res["cli"] == ["tinydec"] and res["grid"] == ["tinydec"] and res["plan"] == ["tinydec"]
    assert res["deployments"] == [["cc3m", "tinydec"], "cc3m-tinydec"]
    assert res["preset"] == "tinydec"  # no --preset: the family whose D the store has
    assert res["image"] == [64, 64]
