"""A teacher CLIP trained on the synthetic world (`demo.world`): the demo's stand-in for the
decoder's CLIP, trained locally in about a minute on two CPU cores.

What it must share with real CLIP, because the paper's argument depends on it:
  - high zero-shot attribute accuracy: text prompts ("a red shape", "a circle") pick the right
    image attributes (reported as color/shape/texture/position accuracy);
  - a realistic modality gap: a caption's text embedding is far from its image embeddings
    (real CLIP: cosine ~0.3), while two renders of one caption are almost the same image
    embedding. Without the gap, "text embedding as the prediction" would already be a perfect
    prior and the ECLIPSE vs projection comparison would show nothing.

The recipe:
  - open_clip's `CLIP` class with a small config: a ModifiedResNet (the CNN of open_clip's RN50
    family, width 12) at 32 px as the image tower; a causal text transformer 64 wide x 2 layers x
    4 heads over a tiny BPE vocabulary of the caption words. Text width H = embedding dim D = 64:
    the ECLIPSE prior projects the text hidden states with a D -> 512 layer, so H must equal D.
  - half the training captions partial ("a red shape on the left"), the rest the world's own
    captions (which may leave attributes out too), with a multi-positive contrastive loss
    (`MultiPositiveClipLoss`, open_clip's `ClipLoss` generalised to several positives per row);
  - a fixed logit scale of 25 (a temperature; not learnt).
Nothing is added to the embeddings by hand: the modality gap is whatever contrastive training on
the world gives (random initialisation puts each tower's outputs in its own narrow cone, and a
finite temperature never pulls the cones together). `teacher_metrics` reports the matched cosine
and `heldout_gap` the held-out oracle - text-shift gap, so a run always says what kind of
testbed it had.

Why 25 (the measurements: BENCHMARKS.md): the scale trades the two gap figures against each other. A
high scale keeps the towers' cones apart (CLIP-like matched cosine) but also keeps every image embedding
in one narrow cone (renders of different captions alike), and then a constant shift of the text embedding
is already almost the oracle. The held-out gap is what the experiment needs (a prior must have room to
beat text-shift), so the lowest scale measured; its matched cosine lies above real CLIP's 0.2-0.4 (that
goal is missed, knowingly).

The saved model is an ordinary open_clip model: `save_encoder` writes an `open_clip_config.json` +
safetensors folder that `pipeline.encoders.load_encoder(path)` loads like any preset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from demo.render import render_batch
from demo.world import (
    ATTRIBUTES,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    TEXTURES,
    ObjectSpec,
    SceneSpec,
    World,
    caption,
    caption_words,
    split_by_pairs,
)
from pipeline.bpe import build_bpe_tokenizer
from pipeline.encoders import ClipEncoder, OpenClipEncoder, save_encoder
from storage_schema.schema import EncoderInfo
from training.trainer import param_groups

log = logging.getLogger(__name__)

TEACHER_PRESET = "world-teacher"
TOKENIZER_NAME = "world-teacher-tokenizer"  # text_cfg.hf_tokenizer_name: open_clip then reads the folder's tokenizer
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


# ----------------------------------------------------------------------------------------------
# Configuration and report


@dataclass(frozen=True)
class TeacherConfig:
    steps: int = 600
    batch_size: int = 256  # distinct captions per batch
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    embed_dim: int = 64  # D; the text width H equals it (see the module docstring)
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 20  # the longest caption ("a picture of an orange outlined ... diamond") is 17 tokens
    vision_width: int = 12  # ModifiedResNet width: 12 -> 384 channels before the attention pool
    vision_layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    image_size: int = 32  # ModifiedResNet needs a multiple of 32
    logit_scale: float = 25.0  # fixed (not trained); the module docstring says why this value
    partial_fraction: float = 0.5
    # torch intra-op threads; None leaves torch's own setting (OMP_NUM_THREADS where set). Not 2 fixed: beside one
    # busy process on 2 cores, 40 steps took 24.6 s on 2 threads and 10.1 s on 1 (8.3 / 9.2 s on an idle machine).
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.image_size % 32:
            raise ValueError("image_size must be a multiple of 32 (ModifiedResNet downsamples 32x)")
        if self.embed_dim % self.text_heads:
            raise ValueError("embed_dim must be divisible by text_heads")

    def model_cfg(self, vocab_size: int) -> dict[str, Any]:
        """The open_clip model config written to `open_clip_config.json`."""
        return {
            "embed_dim": self.embed_dim,
            "init_logit_scale": math.log(self.logit_scale),
            "vision_cfg": {"image_size": self.image_size, "layers": list(self.vision_layers),
                           "width": self.vision_width, "head_width": 64},
            "text_cfg": {"context_length": self.context_length, "vocab_size": vocab_size,
                         "width": self.embed_dim, "heads": self.text_heads, "layers": self.text_layers,
                         "proj_bias": True, "pool_type": "argmax", "hf_tokenizer_name": TOKENIZER_NAME},
        }


@dataclass
class TeacherReport:
    """Zero-shot accuracies (prompts naming one attribute, argmax cosine), the gap figures, timing."""

    color_acc: float
    shape_acc: float
    texture_acc: float | None  # None when the world does not vary the attribute
    position_acc: float | None
    caption_acc: float  # the exact caption among all single-object captions (576 in the default world)
    matched_cos: float  # cos(text embed of a caption, image embed of a render of it)
    image_image_cos: float  # cos between two renders of the same caption
    image_image_cos_other: float  # ... of different captions
    text_text_cos_other: float  # cos between text embeds of different captions
    relation_acc: float | None = None  # two-object worlds: true caption beats the relation-swapped one
    seconds: float = 0.0  # training wall time
    steps: int = 0
    final_loss: float | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        rows = [(k, v) for k, v in self.to_dict().items() if v is not None]
        return "\n".join(f"{k:>22}  {v:.3f}" if isinstance(v, float) else f"{k:>22}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------------------------
# Tokenizer: CLIP's byte-level BPE with merges for exactly the caption words


def build_tokenizer(words: Sequence[str] | None = None, context_length: int = TeacherConfig.context_length) -> Any:
    """A transformers CLIPTokenizer in which each caption word (default: every word the world can
    write) is one token; any other text stays encodable, byte by byte."""
    return build_bpe_tokenizer(caption_words() if words is None else words, context_length)


def _open_clip_tokenizer(hf_tokenizer: Any, context_length: int) -> Any:
    """open_clip's HFTokenizer around `hf_tokenizer`: the class `load_encoder` builds from the folder."""
    from open_clip.tokenizer import HFTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        hf_tokenizer.save_pretrained(tmp)
        return HFTokenizer(tmp, context_length=context_length)


# ----------------------------------------------------------------------------------------------
# The loss


class MultiPositiveClipLoss(ClipLoss):
    """open_clip's ClipLoss with several positives per row: `positives[i, j]` says caption j
    describes image i. Each direction is a cross-entropy against the uniform distribution over
    the row's positives; with `positives = I` this is exactly ClipLoss."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                positives: torch.Tensor | None = None, logit_bias: torch.Tensor | None = None,
                output_dict: bool = False) -> Any:
        if positives is None:
            return super().forward(image_features, text_features, logit_scale, logit_bias, output_dict)
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        p = positives.to(logits_per_image.dtype)
        target_i = p / p.sum(dim=1, keepdim=True)
        target_t = p.T / p.T.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits_per_image, target_i) + F.cross_entropy(logits_per_text, target_t)) / 2
        return {"contrastive_loss": loss} if output_dict else loss


# ----------------------------------------------------------------------------------------------
# Training batches: distinct (partial) captions, their renders, and which captions fit which image

_VOCABS = {"color": COLORS, "shape": SHAPES, "texture": TEXTURES, "position": POSITIONS}
_CANONICAL = {"right_of": "left_of", "below": "above"}  # "A right of B" == "B left of A"


@dataclass
class Batch:
    specs: list[SceneSpec]
    captions: list[str]
    positives: np.ndarray  # [B, B] bool: caption j describes image i


class BatchSampler:
    """Draws batches of distinct captions, a `partial_fraction` of them partial (the others the
    world's own captions), with their positives matrix."""

    def __init__(self, world: World, batch_size: int, partial_fraction: float, seed: int) -> None:
        self.world = world
        self.batch_size = batch_size
        self.partial_fraction = partial_fraction
        self.rng = np.random.default_rng([0x7EAC, seed])
        self.mentionable = [a for a in ATTRIBUTES if a in ("color", "shape") or a in world.attributes]

    def _omit(self, n_objects: int) -> list[frozenset[str]]:
        """Attributes each object's caption leaves out (positions only single objects state)."""
        names = self.mentionable if n_objects == 1 else [a for a in self.mentionable if a != "position"]
        while True:
            drop = self.rng.random((n_objects, len(names))) < 0.5
            if drop.any() and not drop.all():  # partial: something left out, something said
                return [frozenset(a for a, d in zip(names, row, strict=True) if d) for row in drop]

    def sample(self) -> Batch:
        world, rng = self.world, self.rng
        specs: list[SceneSpec] = []
        captions: list[str] = []
        omits: list[list[frozenset[str]]] = []
        seen: set[str] = set()
        for _ in range(20):  # a small world may not have batch_size distinct captions: stop trying
            need = self.batch_size - len(specs)
            if need <= 0:
                break
            draws = [world.draw_content(rng, 2 if rng.random() < world.two_object_fraction else 1)
                     for _ in range(need + need // 4 + 4)]
            placed = world.place(rng, [c for c, _ in draws], [r for _, r in draws])
            for spec in placed:
                om = self._omit(spec.n_objects) if rng.random() < self.partial_fraction else \
                    [frozenset(spec.omitted)] * spec.n_objects
                text = caption(spec, omit_per_object=om)
                if text not in seen and len(specs) < self.batch_size:
                    seen.add(text)
                    specs.append(spec)
                    captions.append(text)
                    omits.append(om)
        return Batch(specs, captions, positives_matrix(specs, omits))


def positives_matrix(specs: Sequence[SceneSpec], omits: Sequence[Sequence[Collection[str]]]) -> np.ndarray:
    """[B, B] bool: the caption of spec j, with attributes `omits[j]` left out, is true of image i.

    True iff both images have the same number of objects, the same relation (after writing
    "right of"/"below" as the mirrored "left of"/"above"), and every attribute caption j states
    matches image i's object in the same role.
    """
    b = len(specs)
    attrs = np.full((b, 2, len(ATTRIBUTES)), -1, dtype=np.int16)
    stated = np.zeros((b, 2, len(ATTRIBUTES)), dtype=bool)
    n_obj = np.array([s.n_objects for s in specs])
    rel = np.full(b, -1, dtype=np.int16)
    for i, (spec, om) in enumerate(zip(specs, omits, strict=True)):
        objs, oms = list(spec.objects), list(om)
        if spec.relation is not None:
            relation = spec.relation
            if relation in _CANONICAL:
                objs, oms, relation = objs[::-1], oms[::-1], _CANONICAL[relation]
            rel[i] = RELATIONS.index(relation)
        for k, (obj, o) in enumerate(zip(objs, oms, strict=True)):
            for a, name in enumerate(ATTRIBUTES):
                value = getattr(obj, name)
                if value is None:
                    continue
                attrs[i, k, a] = _VOCABS[name].index(value)
                # Pair captions never state positions: the relation implies them.
                stated[i, k, a] = name not in o and not (name == "position" and spec.n_objects == 2)
    agree = (attrs[:, None] == attrs[None, :]) | ~stated[None, :]  # [image i, caption j, object, attribute]
    return agree.all(axis=(2, 3)) & (n_obj[:, None] == n_obj[None, :]) & (rel[:, None] == rel[None, :])



# ----------------------------------------------------------------------------------------------
# Model


def pixels_from_uint8(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> normalised [B, 3, H, W] float32, bit-identical to open_clip's
    ToTensor + Normalize on the same pixels (the encoder's own preprocessing at load time)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return x.sub(mean).div(std)


def _encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text` on tokens cut after the batch's longest caption: the tower is causal,
    so real tokens never see the padding and the result is the same; it saves ~40 % of the text
    compute in training (captions are 5-17 tokens of a 20-token context)."""
    from open_clip.transformer import text_global_pool

    length = int(tokens.argmax(dim=-1).max()) + 1  # EOS has the highest id; its position + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type)
    return model.text_projection(x)


def build_model(config: TeacherConfig, vocab_size: int, seed: int) -> Any:
    """An open_clip CLIP with a frozen logit scale."""
    import open_clip
    from open_clip.model import set_model_preprocess_cfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config.model_cfg(vocab_size))
    set_model_preprocess_cfg(model, {"size": config.image_size, "mode": "RGB", "mean": IMAGE_MEAN,
                                     "std": IMAGE_STD, "interpolation": "bicubic", "resize_mode": "shortest",
                                     "fill_color": 0})
    model.logit_scale.requires_grad_(False)
    return model


def _weights_digest(model: Any) -> str:
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class TrainedTeacher:
    encoder: OpenClipEncoder
    seconds: float
    losses: list[float] = field(default_factory=list)


def fit_teacher(world: World, config: TeacherConfig | None = None, seed: int = 0,
                log_every: int = 100) -> TrainedTeacher:
    """Train the teacher in memory; returns it wrapped as an `OpenClipEncoder` (eval mode, CPU)."""
    config = config or TeacherConfig()
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        return _fit(world, config, seed, log_every)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: give the caller its own back


def _fit(world: World, config: TeacherConfig, seed: int, log_every: int) -> TrainedTeacher:
    t0 = time.perf_counter()
    hf_tok = build_tokenizer(caption_words(), config.context_length)
    tokenizer = _open_clip_tokenizer(hf_tok, config.context_length)
    model = build_model(config, len(hf_tok), seed)
    loss_fn = MultiPositiveClipLoss()
    sampler = BatchSampler(world, config.batch_size, config.partial_fraction, seed)
    token_cache: dict[str, torch.Tensor] = {}

    def tokens_of(captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in token_cache]
        if missing:
            for c, row in zip(missing, tokenizer(missing), strict=True):
                token_cache[c] = row
        return torch.stack([token_cache[c] for c in captions])

    def batch_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = sampler.sample()
        pixels = pixels_from_uint8(render_batch(b.specs, config.image_size))
        return pixels, tokens_of(b.captions), torch.from_numpy(b.positives)

    model.train()
    pixels, tokens, positives = batch_tensors()
    opt = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    scale = model.logit_scale.exp()
    losses: list[float] = []
    for step in range(config.steps):
        if step > 0:
            pixels, tokens, positives = batch_tensors()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        img = model.encode_image(pixels)
        txt = _encode_text_trimmed(model, tokens)
        loss = loss_fn(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, positives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
        if log_every and (step + 1) % log_every == 0:
            log.info("teacher step %d/%d loss %.3f (%.1fs)", step + 1, config.steps, loss.detach().item(),
                     time.perf_counter() - t0)
    model.eval()
    seconds = time.perf_counter() - t0
    digest = _weights_digest(model)
    label = f"{TEACHER_PRESET}/{world.fingerprint}/seed{seed}"
    info = EncoderInfo(
        preset=TEACHER_PRESET,
        image_model=f"{label}/image",
        text_model=f"{label}/text",
        image_dim=config.embed_dim,
        text_dim=config.embed_dim,
        hidden_dim=config.embed_dim,
        tokenizer=f"{TEACHER_PRESET}/{TOKENIZER_NAME}",
        context_length=config.context_length,
        # The weights' digest: two teachers (other seed or steps) must never share one store.
        image_revision=digest,
        text_revision=digest,
    )
    transform = _val_transform(model)
    encoder = OpenClipEncoder(model, transform, tokenizer, config.model_cfg(len(hf_tok)), info,
                              torch.device("cpu"), torch.float32)
    return TrainedTeacher(encoder=encoder, seconds=seconds, losses=losses)


def _val_transform(model: Any) -> Any:
    """open_clip's own eval transform for the model's preprocess config (what loading builds)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


# ----------------------------------------------------------------------------------------------
# Metrics


def _normed(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _encode_specs(encoder: ClipEncoder, specs: Sequence[SceneSpec], size: int, batch: int = 256) -> torch.Tensor:
    """Image embeds through the encoder's own preprocessing (PIL in, as the encode stage does)."""
    from PIL import Image

    out = []
    for i in range(0, len(specs), batch):
        arr = render_batch(specs[i:i + batch], size)
        images = [Image.fromarray(a, mode="RGB") for a in arr]
        out.append(encoder.encode_images(encoder.preprocess(images)).float().cpu())
    return torch.cat(out)


def _encode_captions(encoder: ClipEncoder, captions: Sequence[str], batch: int = 512) -> torch.Tensor:
    return torch.cat([encoder.encode_texts(list(captions[i:i + batch])).text_embeds.float().cpu()
                      for i in range(0, len(captions), batch)])


def _zero_shot(img: torch.Tensor, prompts: torch.Tensor, labels: Sequence[int]) -> float:
    pred = (_normed(img) @ _normed(prompts).T).argmax(dim=1)
    return float((pred == torch.tensor(labels)).float().mean())


def teacher_metrics(encoder: ClipEncoder, world: World, n: int = 600, seed: int = 12345,
                    image_size: int | None = None) -> TeacherReport:
    """Zero-shot accuracies and gap figures of any encoder on fresh single-object renders
    (and two-object renders for `relation_acc` when the world has them)."""
    size = image_size or world.image_size
    rng = np.random.default_rng([0xE7A1, seed])
    contents = world.single_object_contents()
    picks = [contents[int(i)] for i in rng.integers(len(contents), size=n)]
    a = world.place(rng, [[c] for c in picks], [None] * n)
    b = world.place(rng, [[c] for c in picks], [None] * n)  # second renders of the same captions
    img_a, img_b = _encode_specs(encoder, a, size), _encode_specs(encoder, b, size)
    all_caps = world.all_single_object_captions()
    txt_all = _encode_captions(encoder, all_caps)
    index = {c: i for i, c in enumerate(contents)}
    own = torch.tensor([index[c] for c in picks])

    accs: dict[str, float | None] = {}
    for k, name in enumerate(ATTRIBUTES):
        values = getattr(world, name + "s")
        if name not in world.attributes:
            accs[name] = None
            continue
        # One prompt per value that names only this attribute: "a red shape", "a circle", ...
        omit = [a for a in ATTRIBUTES if a != name]
        prompts = [ObjectSpec(*_fill(name, v), 0.5, 0.5, 0.15, 0.0, (0, 0, 0)).describe(omit) for v in values]
        accs[name] = _zero_shot(img_a, _encode_captions(encoder, prompts), [values.index(c[k]) for c in picks])

    ia, ib, t_all = _normed(img_a), _normed(img_b), _normed(txt_all)
    caption_acc = float(((ia @ t_all.T).argmax(dim=1) == own).float().mean())
    matched = float((ia * t_all[own]).sum(-1).mean())
    same = float((ia * ib).sum(-1).mean())
    # Different captions: image a_i against b_{i+1}, text of caption j against j+1 (random pairs).
    shift = torch.roll(torch.arange(n), 1)
    differ = own != own[shift]
    other_img = float((ia * ib[shift]).sum(-1)[differ].mean())
    perm = torch.randperm(len(all_caps), generator=torch.Generator().manual_seed(seed))
    other_txt = float((t_all * t_all[perm]).sum(-1)[perm != torch.arange(len(all_caps))].mean())

    relation_acc = None
    if world.two_object_fraction > 0:
        relation_acc = _relation_accuracy(encoder, world, rng, max(100, n // 3), size)
    return TeacherReport(
        color_acc=accs["color"], shape_acc=accs["shape"], texture_acc=accs["texture"],
        position_acc=accs["position"], caption_acc=caption_acc, matched_cos=matched, image_image_cos=same,
        image_image_cos_other=other_img, text_text_cos_other=other_txt, relation_acc=relation_acc,
    )


def heldout_gap(encoder: ClipEncoder, world: World, held_pairs: Collection[tuple[str, str]], n_captions: int = 300,
                renders: int = 6, fit_n: int = 2000, seed: int = 0) -> dict[str, float | int]:
    """How much a prior can gain over a constant vector, on held-out compositions.

    text-shift (text - mean text + mean image, means over fresh held-in scenes) against the oracle
    (the mean image embedding of the other `renders - 1` renders of the same caption), both scored
    by cosine to each render of `n_captions` held-out captions. Renders of one caption share its
    content, template and omitted attributes; everything unsaid is drawn anew, so the oracle is
    E[image | caption] as the world defines it. `gap` = oracle - text-shift.
    """
    from evaluation.metrics import text_shift

    rng = np.random.default_rng([0x6A9, seed])
    size = world.image_size
    fit, _ = split_by_pairs((world.random_spec(rng) for _ in range(fit_n)), held_pairs)
    mean_img = _encode_specs(encoder, fit, size).double().mean(0)
    mean_txt = _encode_captions(encoder, [caption(s) for s in fit]).double().mean(0)
    held: list[SceneSpec] = []
    while len(held) < n_captions:
        held += split_by_pairs((world.random_spec(rng) for _ in range(4 * n_captions)), held_pairs)[1]
    held = held[:n_captions]
    contents = [[(o.color, o.shape, o.texture, o.position) for o in s.objects] for s in held]
    specs: list[SceneSpec] = []
    for first, content in zip(held, contents, strict=True):
        again = world.place(rng, [content] * (renders - 1), [first.relation] * (renders - 1))
        specs += [first] + [dataclasses.replace(a, omitted=first.omitted, template=first.template) for a in again]
    img = _encode_specs(encoder, specs, size).double().view(n_captions, renders, -1)
    txt = _encode_captions(encoder, [caption(s) for s in held]).double()
    oracle = (img.sum(1, keepdim=True) - img) / (renders - 1)
    shift = torch.from_numpy(text_shift(txt.numpy(), mean_txt.numpy(), mean_img.numpy()))[:, None].expand_as(img)
    cos_oracle = float(F.cosine_similarity(oracle, img, dim=-1).mean())
    cos_shift = float(F.cosine_similarity(shift, img, dim=-1).mean())
    cos_text = float(F.cosine_similarity(txt[:, None].expand_as(img), img, dim=-1).mean())
    return {"oracle_cos": cos_oracle, "text_shift_cos": cos_shift, "gap": cos_oracle - cos_shift,
            "text_emb_cos": cos_text, "captions": n_captions, "renders_per_caption": renders,
            "heldin_scenes_for_means": len(fit)}


_MIRROR = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def _fill(name: str, value: str) -> tuple[str, str, str | None, str | None]:
    """Content with `value` in slot `name` and placeholders elsewhere (left out of the prompt)."""
    slots = {"color": COLORS[0], "shape": SHAPES[0], "texture": None, "position": None, name: value}
    return slots["color"], slots["shape"], slots["texture"], slots["position"]


def _relation_accuracy(encoder: ClipEncoder, world: World, rng: np.random.Generator, n: int, size: int) -> float:
    """Binding: a two-object image is closer to its caption than to the one with the mirrored
    relation ("A left of B" vs "A right of B")."""
    draws = [world.draw_content(rng, 2) for _ in range(n)]
    specs = world.place(rng, [c for c, _ in draws], [r for _, r in draws])
    swapped = [dataclasses.replace(s, relation=_MIRROR[s.relation]) for s in specs]
    img = _normed(_encode_specs(encoder, specs, size))
    true_t = _normed(_encode_captions(encoder, [caption(s) for s in specs]))
    swap_t = _normed(_encode_captions(encoder, [caption(s) for s in swapped]))
    return float(((img * true_t).sum(-1) > (img * swap_t).sum(-1)).float().mean())


# ----------------------------------------------------------------------------------------------
# Entry point


def train_teacher(world: World | None = None, steps: int = 600, seed: int = 0,
                  out_dir: str | os.PathLike | None = None, config: TeacherConfig | None = None,
                  metrics_n: int = 600) -> TeacherReport:
    """Train the teacher, save it as an encoder folder at `out_dir` (if given; `load_encoder(out_dir)`
    loads it) with its report in `teacher_report.json`, and return the report."""
    world = world or World()
    config = dataclasses.replace(config or TeacherConfig(), steps=steps)
    trained = fit_teacher(world, config, seed)
    report = teacher_metrics(trained.encoder, world, n=metrics_n, image_size=config.image_size)
    report.seconds, report.steps = trained.seconds, steps
    report.final_loss = float(np.mean(trained.losses[-20:])) if trained.losses else None
    if out_dir is not None:
        path = save_encoder(trained.encoder, out_dir)
        report.path = str(path)
        (path / "teacher_report.json").write_text(json.dumps(
            {"report": report.to_dict(), "config": dataclasses.asdict(config), "world": world.to_dict(),
             "seed": seed}, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m demo.teacher", description="Train the world's teacher CLIP.")
    ap.add_argument("--out", required=True, help="encoder folder to write")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default=None, help="World config as JSON (default: the default world)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own, OMP_NUM_THREADS where set)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world = World.from_dict(json.loads(args.world)) if args.world else World()
    report = train_teacher(world, args.steps, args.seed, args.out, TeacherConfig(num_threads=args.threads))
    print(report.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
