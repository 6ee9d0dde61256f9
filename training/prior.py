"""The time-free ECLIPSE prior: a PriorTransformer without a timestep input.

Built from diffusers components (BasicTransformerBlock, ModelMixin, ConfigMixin), in the
released ECLIPSE layout: the same config.json keys (including `_class_name:
"PriorTransformer"`) and the same state-dict names and shapes, so published ECLIPSE priors
load here and the priors trained here load in the ECLIPSE inference pipelines.

Token order (80 positions for the presets): 77 projected text hidden states, the projected
text embedding, the projected noise vector, the learned `prd` token. The causal mask plus
the text padding mask let the `prd` token see everything; the prediction is read off it.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from pipeline.families import FAMILIES

# Additive mask value of the released class; finite, so a fully padded text row cannot
# produce NaNs (the unconditional "null text" of the diffusion baseline relies on it).
MASK_VALUE = -10000.0

# Presets: the released ECLIPSE configs (16 heads x 32 dims, 10 layers), one per decoder family
# (pipeline.families: its D), a tiny one for tests, and the demo's (sized to fit its held-in rows on
# 2 CPU cores). `embedding_dim` is the CLIP dim D of the store.
PRIOR_PRESETS: dict[str, dict] = {
    **{name: {**f.prior, "embedding_dim": f.embedding_dim} for name, f in FAMILIES.items()},
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=32),
    "demo": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, embedding_dim=64),
}
PresetName = Literal[tuple(PRIOR_PRESETS)]  # typed params (flows) use this one list
RELEASED_PRESETS: tuple[str, ...] = tuple(FAMILIES)
# Everything else is shared by all presets and equals the released config.
COMMON = dict(
    num_embeddings=77,
    additional_embeddings=3,
    dropout=0.0,
    norm_in_type=None,
    embedding_proj_norm_type=None,
    encoder_hid_proj_type="linear",
    added_emb_type="prd",
    embedding_proj_dim=None,
    clip_embed_dim=None,
)


def preset_for_store(image_dim: int, context_length: int) -> tuple[PresetName, dict[str, int]]:
    """The prior to train on a store of width D = `image_dim` when none is named: the released preset of
    that D, else `tiny` sized to the store (its overrides: `embedding_dim`, `text_length`)."""
    for name in RELEASED_PRESETS:
        if PRIOR_PRESETS[name]["embedding_dim"] == image_dim:
            return name, {}
    return "tiny", {"embedding_dim": image_dim, "text_length": context_length}


def preset_config(name: str, embedding_dim: int | None = None, text_length: int | None = None, *,
                  num_layers: int | None = None, dropout: float | None = None, text_hidden: bool = True) -> dict:
    """Constructor kwargs of a preset; `embedding_dim` overrides D (e.g. a tiny test encoder) and
    `text_length` the 77 text positions (a small encoder with a short context: shorter sequences).

    The architecture knobs of the memorisation study (benchmarks/memorisation.py), all saved in config.json
    so the prior loads as it trained: `num_layers` overrides the preset's depth, `dropout` the blocks' dropout
    (0.0 as released), and `text_hidden=False` drops the text hidden-state tokens (`encoder_hid_proj_type`
    None: the prior sees the pooled text embedding, the noise and its `prd` token only)."""
    if name not in PRIOR_PRESETS:
        raise ValueError(f"unknown prior preset {name!r}; choose one of {sorted(PRIOR_PRESETS)}")
    cfg = {**PRIOR_PRESETS[name], **COMMON}
    if embedding_dim is not None:
        cfg["embedding_dim"] = int(embedding_dim)
    if text_length is not None:
        cfg["num_embeddings"] = int(text_length)
    if num_layers is not None:
        if int(num_layers) <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers!r}")
        cfg["num_layers"] = int(num_layers)
    if dropout is not None:
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        cfg["dropout"] = float(dropout)
    if not text_hidden:
        cfg["encoder_hid_proj_type"] = None
    return cfg


@dataclass
class PriorTransformerOutput(BaseOutput):
    predicted_image_embedding: torch.Tensor


def additive_attention_mask(
    text_mask: torch.Tensor | None,
    batch_size: int,
    num_embeddings: int,
    additional_embeddings: int,
    heads: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """[B*heads, L, L] additive mask: causal over all L tokens, plus text padding.

    The released class skips masking entirely when no text mask is given; here a missing
    mask means "all text tokens are real" and the causal mask still applies.
    """
    length = num_embeddings + additional_embeddings
    causal = torch.full((length, length), MASK_VALUE, device=device, dtype=torch.float32).triu_(1)
    if text_mask is None:
        pad = torch.zeros(batch_size, length, device=device, dtype=torch.float32)
    else:
        pad = (1.0 - text_mask.to(device=device, dtype=torch.float32)) * MASK_VALUE
        pad = F.pad(pad, (0, additional_embeddings), value=0.0)
    mask = (pad[:, None, :] + causal[None]).to(dtype)
    # One head-repeated copy up front; the attention processors would otherwise repeat it in every layer.
    return mask.repeat_interleave(heads, dim=0)


def _optional_layer(option: str, kind: str | None, **builders: Callable[[], nn.Module]) -> nn.Module | None:
    """None when `kind` is None, else the layer `builders[kind]` builds; an unknown kind is an error."""
    if kind is None:
        return None
    if kind not in builders:
        raise ValueError(f"unsupported {option}: {kind!r}")
    return builders[kind]()


class PriorTransformer(ModelMixin, ConfigMixin):
    """ECLIPSE's time-free prior. Named as the released class so config.json's `_class_name` matches.

    forward(noise [B, D], text_embeds [B, D], text_hidden [B, 77, D], text_mask [B, 77]) -> image_embeds [B, D].
    The text tower width H must equal D: the released layout's `encoder_hidden_states_proj`
    is (inner, D). `clip_mean`/`clip_std` exist only for layout compatibility: ECLIPSE predicts
    raw image embeddings and never standardises them.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 32,
        num_layers: int = 10,
        embedding_dim: int = 1280,
        num_embeddings: int = 77,
        additional_embeddings: int = 3,
        dropout: float = 0.0,
        norm_in_type: str | None = None,
        embedding_proj_norm_type: str | None = None,
        encoder_hid_proj_type: str | None = "linear",
        added_emb_type: str | None = "prd",
        embedding_proj_dim: int | None = None,
        clip_embed_dim: int | None = None,
    ):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        embedding_proj_dim = embedding_proj_dim or embedding_dim
        clip_embed_dim = clip_embed_dim or embedding_dim
        expected_extra = 2 + (added_emb_type == "prd")
        if additional_embeddings != expected_extra:
            raise ValueError(
                f"additional_embeddings={additional_embeddings}, but this time-free prior adds exactly "
                f"{expected_extra} tokens (text embedding, noise{', prd' if added_emb_type == 'prd' else ''})"
            )

        self.proj_in = nn.Linear(embedding_dim, inner)  # the noise vector
        self.embedding_proj_norm = _optional_layer("embedding_proj_norm_type", embedding_proj_norm_type,
                                                   layer=lambda: nn.LayerNorm(embedding_proj_dim))
        self.embedding_proj = nn.Linear(embedding_proj_dim, inner)  # the pooled text embedding
        self.encoder_hidden_states_proj = _optional_layer(  # text hidden states, H == D
            "encoder_hid_proj_type", encoder_hid_proj_type, linear=lambda: nn.Linear(embedding_dim, inner))

        self.positional_embedding = nn.Parameter(torch.zeros(1, num_embeddings + additional_embeddings, inner))
        if added_emb_type == "prd":
            self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner))
        elif added_emb_type is None:
            self.prd_embedding = None
        else:
            raise ValueError(f"unsupported added_emb_type: {added_emb_type!r} (choose 'prd' or None)")

        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, num_attention_heads, attention_head_dim, dropout=dropout, activation_fn="gelu",
                attention_bias=True,
            )
            for _ in range(num_layers)
        )
        self.norm_in = _optional_layer("norm_in_type", norm_in_type, layer=lambda: nn.LayerNorm(inner))
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, clip_embed_dim)

        # Parameters (not buffers) in the released layout, so they count and save the same way;
        # frozen, and identity-valued so `post_process_latents` is harmless.
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_embed_dim), requires_grad=False)
        self.clip_std = nn.Parameter(torch.ones(1, clip_embed_dim), requires_grad=False)

        # The released class starts these at zero (they are loaded, not trained, there). From
        # scratch, zero position/prd tokens make the prd query identical for every sample at
        # layer 0, so give them the usual small random init.
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)
        if self.prd_embedding is not None:
            nn.init.trunc_normal_(self.prd_embedding, std=0.02)

    def forward(
        self,
        hidden_states: torch.Tensor,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PriorTransformerOutput | tuple[torch.Tensor]:
        """hidden_states: the noise [B, D]; proj_embedding: text_embeds [B, D];
        encoder_hidden_states: text hidden states [B, 77, D]; attention_mask: [B, 77] bool, True on real tokens."""
        cfg = self.config
        batch = hidden_states.shape[0]
        tokens: list[torch.Tensor] = []
        if self.encoder_hidden_states_proj is not None:
            if encoder_hidden_states is None:
                raise ValueError("this prior needs encoder_hidden_states (the text tower's last_hidden_state)")
            if encoder_hidden_states.shape[1:] != (cfg.num_embeddings, cfg.embedding_dim):
                raise ValueError(
                    f"encoder_hidden_states must be [B, {cfg.num_embeddings}, {cfg.embedding_dim}] (padded text "
                    f"hidden states, width H = D), got {tuple(encoder_hidden_states.shape)}; a text tower of "
                    f"another width than the image embedding dim is not supported by the released layout"
                )
            tokens.append(self.encoder_hidden_states_proj(encoder_hidden_states))
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        tokens.append(self.embedding_proj(proj_embedding)[:, None])
        tokens.append(self.proj_in(hidden_states)[:, None])
        if self.prd_embedding is not None:
            tokens.append(self.prd_embedding.to(tokens[-1].dtype).expand(batch, -1, -1))
        x = torch.cat(tokens, dim=1)
        x = x + self.positional_embedding.to(x.dtype)[:, : x.shape[1]]

        mask = None
        if self.encoder_hidden_states_proj is not None:
            mask = additive_attention_mask(
                attention_mask, batch, cfg.num_embeddings, cfg.additional_embeddings, cfg.num_attention_heads,
                x.dtype, x.device,
            )
        if self.norm_in is not None:
            x = self.norm_in(x)
        for block in self.transformer_blocks:
            x = block(x, attention_mask=mask)
        x = self.norm_out(x)
        # With a prd token the prediction is read off it (last position); without one, off the noise token.
        out = self.proj_to_clip_embeddings(x[:, -1])
        if not return_dict:
            return (out,)
        return PriorTransformerOutput(predicted_image_embedding=out)

    def post_process_latents(self, prior_latents: torch.Tensor) -> torch.Tensor:
        return prior_latents * self.clip_std + self.clip_mean


def build_prior(preset: str, embedding_dim: int | None = None, text_length: int | None = None,
                **arch) -> PriorTransformer:
    """The prior of a preset; `arch`: preset_config's num_layers, dropout, text_hidden."""
    return PriorTransformer(**preset_config(preset, embedding_dim, text_length, **arch))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prior_class(config: dict) -> type:
    """Our time-free prior, or diffusers' stock one (diffusion baseline): both save `_class_name: PriorTransformer`."""
    if "time_embed_dim" in config or "time_embed_act_fn" in config:
        from diffusers import PriorTransformer as DiffusionPriorTransformer

        return DiffusionPriorTransformer
    return PriorTransformer


def load_prior(path: str | os.PathLike) -> nn.Module:
    """Load a prior folder (config.json + diffusion_pytorch_model.safetensors) of either kind."""
    config = json.loads((Path(path) / "config.json").read_text())
    # low_cpu_mem_usage=False: the fast path needs `accelerate`, which this project does not install
    return prior_class(config).from_pretrained(path, low_cpu_mem_usage=False)
