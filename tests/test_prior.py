"""The time-free ECLIPSE prior: sizes, released layout, save/load, masking."""

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.prior import PriorTransformer, build_prior, count_parameters, load_prior, preset_config

DATA = Path(__file__).parent / "data"


def released_layout() -> tuple[dict[str, tuple], dict[str, tuple], dict[int, int]]:
    """(names -> shape for D=1280, names -> shape for D=768, D -> total parameters) from the tsv."""
    big, small, totals = {}, {}, {}
    for line in (DATA / "eclipse-prior-state-dict.tsv").read_text().splitlines():
        if line.startswith("# total parameters:"):
            # "# total parameters: 34193152 (1280), 33143040 (768)"
            for part in line.split(":", 1)[1].split(","):
                count, dim = part.split()
                totals[int(dim.strip("()"))] = int(count)
        elif line and not line.startswith("#"):
            name, s_big, s_small = line.split("\t")
            big[name], small[name] = ast.literal_eval(s_big), ast.literal_eval(s_small)  # "(512, 1280)"
    return big, small, totals


def meta_prior(preset: str) -> PriorTransformer:
    with torch.device("meta"):  # no memory, no init cost: names, shapes and counts only
        return build_prior(preset)


@pytest.mark.parametrize("preset,expected", [("kandinsky22", 34_193_152), ("karlo", 33_143_040)])
def test_parameter_counts_of_presets(preset, expected):
    _, _, totals = released_layout()
    assert totals[preset_config(preset)["embedding_dim"]] == expected
    assert count_parameters(meta_prior(preset)) == expected


@pytest.mark.parametrize("preset,column", [("kandinsky22", 0), ("karlo", 1)])
def test_state_dict_names_and_shapes_equal_released_layout(preset, column):
    expected = released_layout()[column]
    got = {k: tuple(v.shape) for k, v in meta_prior(preset).state_dict().items()}
    assert list(got) == list(expected)  # same names, same order
    assert got == expected


def test_config_keys_equal_released_config(tmp_path):
    released = json.loads((DATA / "eclipse-prior-config.json").read_text())
    build_prior("tiny").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved) == set(released)
    assert saved["_class_name"] == "PriorTransformer"
    # Everything but the size-dependent keys equals the released Kandinsky v2.2 prior's values
    assert {k: v for k, v in released.items() if not k.startswith("_")} == preset_config("kandinsky22")


def _inputs(d: int, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise, text = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    hidden = torch.randn(b, 77, d, generator=g)
    mask = torch.zeros(b, 77, dtype=torch.bool)
    for i, n in enumerate([5, 12, 77][:b]):
        mask[i, :n] = True
    return noise, text, hidden, mask


def test_save_load_round_trip_is_exact_and_uses_safetensors(tmp_path):
    model = build_prior("tiny").eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    weights = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert set(weights) == set(model.state_dict())
    loaded = load_prior(tmp_path).eval()
    assert isinstance(loaded, PriorTransformer)
    x = _inputs(32)
    with torch.no_grad():
        assert torch.equal(model(*x).predicted_image_embedding, loaded(*x).predicted_image_embedding)


def test_a_state_dict_in_the_released_layout_loads_strictly():
    """A checkpoint with exactly the released names and shapes (here: random values) loads with strict=True."""
    big, _, _ = released_layout()
    sd = {name: torch.randn(shape) for name, shape in big.items()}
    model = build_prior("kandinsky22")
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.clip_std, sd["clip_std"])


def test_output_shape_and_padding_does_not_leak():
    model = build_prior("tiny").eval()
    noise, text, hidden, mask = _inputs(32)
    with torch.no_grad():
        out = model(noise, text, hidden, mask).predicted_image_embedding
        assert out.shape == (3, 32)
        garbage = hidden.clone()
        garbage[~mask] = 1000.0  # values at padded positions must not matter
        assert torch.allclose(model(noise, text, garbage, mask).predicted_image_embedding, out, atol=1e-5)
        changed = hidden.clone()
        changed[0, 0] += 1.0  # a real token does matter
        assert not torch.allclose(model(noise, text, changed, mask).predicted_image_embedding[0], out[0])
        # the noise input is used (the prior is a function of eps and z_y, eq. 3)
        assert not torch.allclose(model(noise + 1, text, hidden, mask).predicted_image_embedding, out)


def test_hidden_width_other_than_d_is_refused():
    model = build_prior("tiny")
    noise, text, _, mask = _inputs(32)
    with pytest.raises(ValueError, match="width H = D"):
        model(noise, text, torch.zeros(3, 77, 48), mask)


def test_unknown_preset_and_wrong_extra_tokens_are_refused():
    with pytest.raises(ValueError, match="unknown prior preset"):
        build_prior("huge")
    with pytest.raises(ValueError, match="additional_embeddings"):
        PriorTransformer(**{**preset_config("tiny"), "additional_embeddings": 4})


def test_optional_layers_are_built_on_request_and_unknown_kinds_are_refused():
    tiny = preset_config("tiny")
    plain = PriorTransformer(**tiny)
    assert plain.norm_in is None and plain.embedding_proj_norm is None
    assert isinstance(plain.encoder_hidden_states_proj, torch.nn.Linear)
    normed = PriorTransformer(**tiny | {"norm_in_type": "layer", "embedding_proj_norm_type": "layer"})
    assert isinstance(normed.norm_in, torch.nn.LayerNorm) and isinstance(normed.embedding_proj_norm, torch.nn.LayerNorm)
    assert PriorTransformer(**tiny | {"encoder_hid_proj_type": None}).encoder_hidden_states_proj is None
    with pytest.raises(ValueError, match="unsupported norm_in_type: 'batch'"):
        PriorTransformer(**tiny | {"norm_in_type": "batch"})


def test_architecture_knobs_override_the_preset_and_survive_save_load(tmp_path):
    """num_layers, dropout and text_hidden=False (the memorisation study's) change only what they name."""
    tiny = preset_config("tiny")
    assert preset_config("tiny", dropout=0.0, num_layers=None, text_hidden=True) == tiny
    cfg = preset_config("tiny", num_layers=3, dropout=0.25, text_hidden=False)
    assert cfg == tiny | {"num_layers": 3, "dropout": 0.25, "encoder_hid_proj_type": None}
    model = build_prior("tiny", num_layers=3, dropout=0.25, text_hidden=False)
    assert len(model.transformer_blocks) == 3 and model.encoder_hidden_states_proj is None
    model.save_pretrained(tmp_path / "p", safe_serialization=True)
    loaded = load_prior(tmp_path / "p").eval()
    assert (loaded.config.num_layers, loaded.config.dropout, loaded.config.encoder_hid_proj_type) == (3, 0.25, None)
    noise, text, hidden, mask = _inputs(32)
    with torch.no_grad():
        out = loaded(noise, text, hidden, mask).predicted_image_embedding
        # without hidden-state tokens the prediction depends on the text embedding and the noise only
        assert torch.equal(loaded(noise, text, hidden * 0 + 5, ~mask).predicted_image_embedding, out)
        assert not torch.allclose(loaded(noise, text + 1, hidden, mask).predicted_image_embedding, out)
    with pytest.raises(ValueError, match="dropout"):
        preset_config("tiny", dropout=1.0)
    with pytest.raises(ValueError, match="num_layers"):
        preset_config("tiny", num_layers=0)


def test_dropout_is_active_in_training_only():
    model = build_prior("tiny", dropout=0.5)
    noise, text, hidden, mask = _inputs(32)
    torch.manual_seed(0)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(noise, text, hidden, mask).predicted_image_embedding,
                                  model(noise, text, hidden, mask).predicted_image_embedding)
        model.eval()
        assert torch.equal(model(noise, text, hidden, mask).predicted_image_embedding,
                           model(noise, text, hidden, mask).predicted_image_embedding)
