"""Does either term of Eq. 5 swamp the other, at initialisation and after training? The released priors' D.

    python benchmarks/loss_balance.py                          # both parts, as in docs/objectives.md
    python benchmarks/loss_balance.py --part init --batch-size 32 --norms 1 21 40
    python benchmarks/loss_balance.py --part trained --steps 400 --layers 2 --norms 1 21

The balance is grad_ratio = ||grad lambda*L_CLS|| / ||grad L_proj||: 1 = balanced, << 1 the update
follows L_proj alone (eclipse trains as projection), >> 1 it follows L_CLS alone. AdamW normalises each
parameter's step, so the ratio says which term's direction the update takes. Both parts print it for
L_proj averaged over D (`proj_reduction: mean`, the default) and summed over D (Eq. 3's letter), at
lambda 0.2 and tau 0.07, with synthetic embeddings of the norm |z| of real raw CLIP embeddings
(OpenAI's ViT-L/14 image embeddings: ~21; bigG's is not measured here, so a range is swept):

- `init`: each preset's prior at its released size (seed 0), one batch; the ratio over all parameters.
  Matched texts have cosine ~0.3 to their image, as real CLIP pairs do.
- `trained`: for each preset's D, |z| and reduction, an eclipse prior trained as the trainer trains it
  (AdamW lr --lr, weight decay 0.01, one cosine cycle to 0, gradients clipped at 1.0) on a stream of
  fresh synthetic pairs whose image is partly predictable from its text: a 32-dim latent s gives the
  text direction t = norm(s A) and u = norm(s B) (A, B fixed random maps to D), and the image direction
  is 0.3 t + 0.6 u + 0.74 noise, so the matched text-image cosine is ~0.3 and the best possible
  prediction's ~0.67 (a real prior's range); the hidden-state tokens are t plus token noise. Measured as
  the trainer logs it (`grad_ratio` at the output layer, `grad_ratio_cls_proj`): at step 1 and the
  median over the last 10 % of the steps, with L_proj's relative change over the last 20 % of the run
  (converged: under 5 %), the prediction's cosine to the image at the end and the share of steps whose
  gradient norm was clipped. A CPU run uses a shallower prior than the released 10 layers (--layers; the
  ratio is taken at the output layer, whose size is the preset's D) and --text-length real tokens;
  `--layers 10 --text-length 77` on a GPU gives the released size.

The last lines are `name=value` figures: `init_<preset>_z<norm>_<reduction>` and
`trained_<preset>_z<norm>_<reduction>` (the end ratio).
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.monitor import grad_ratio, output_layer_params  # noqa: E402
from training.objectives import DEFAULT_LAMBDA, DEFAULT_TAU, REDUCTIONS, contrastive_loss, projection_loss  # noqa: E402
from training.prior import PRIOR_PRESETS, build_prior  # noqa: E402

TEXT_LEN = 77
REAL_TOKENS = 17  # a typical caption's real tokens
LATENT = 32  # dimensions of the latent that text and image share in the trained part's stream
MIX = (0.3, 0.6, math.sqrt(1 - 0.3**2 - 0.6**2))  # text, u(text), noise: cos(image, text) ~0.3, best ~0.67


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def batch(dim: int, n: int, norm: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    image = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    noise = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    text = F.normalize(0.3 * image + (1 - 0.09) ** 0.5 * noise, dim=-1)  # cosine ~0.3
    hidden = torch.randn(n, TEXT_LEN, dim, generator=gen)
    mask = torch.zeros(n, TEXT_LEN, dtype=torch.bool)
    mask[:, :REAL_TOKENS] = True
    return image * norm, text * norm, hidden * mask[..., None], mask


def at_init(presets: list[str], norms: list[float], batch_size: int) -> dict[str, float]:
    """The ratio over all parameters of each preset's released-size prior at initialisation, one batch."""
    print(f"== at initialisation: batch {batch_size}, lambda {DEFAULT_LAMBDA}, tau {DEFAULT_TAU}, released size, "
          f"seed 0")
    print(f"{'preset':<12}{'D':>6}{'|z|':>6}{'L_proj sum':>12}{'lam*L_CLS':>11}{'ratio(sum)':>12}{'ratio(mean)':>13}")
    figures = {}
    for preset in presets:
        torch.manual_seed(0)
        model = build_prior(preset)
        params = [p for p in model.parameters() if p.requires_grad]
        dim = model.config.embedding_dim
        gen = torch.Generator().manual_seed(0)
        for norm in norms:
            image, text, hidden, mask = batch(dim, batch_size, norm, gen)
            eps = torch.randn(image.shape, generator=gen)
            pred = model(eps, text, hidden, mask).predicted_image_embedding
            cls = DEFAULT_LAMBDA * contrastive_loss(pred, text, DEFAULT_TAU)
            g_cls = grad_norm(cls, params)
            ratio = {r: g_cls / grad_norm(projection_loss(pred, image, r), params) for r in REDUCTIONS}
            proj = projection_loss(pred, image, "sum")
            print(f"{preset:<12}{dim:>6}{norm:>6.0f}{proj.item():>12.1f}{cls.item():>11.3f}{ratio['sum']:>12.3g}"
                  f"{ratio['mean']:>13.3g}", flush=True)
            figures |= {f"init_{preset}_z{norm:g}_{r}": ratio[r] for r in REDUCTIONS}
    return figures


class PairStream:
    """Fresh synthetic pairs of norm |z|. A latent s (LATENT dims) makes the text direction t = norm(s A) and
    u = norm(s B) (A, B fixed); the image direction is MIX . (t, u, noise): text and image live near a
    low-dimensional subspace, as CLIP's embeddings do, and what the text does not say is noise."""

    def __init__(self, dim: int, norm: float, text_len: int, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.dim, self.norm, self.text_len = dim, norm, text_len
        self.to_text = torch.randn(LATENT, dim, generator=self.gen)
        self.to_u = torch.randn(LATENT, dim, generator=self.gen)

    def next(self, n: int) -> tuple[torch.Tensor, ...]:
        latent = torch.randn(n, LATENT, generator=self.gen)
        text, u = F.normalize(latent @ self.to_text, dim=-1), F.normalize(latent @ self.to_u, dim=-1)
        noise = F.normalize(torch.randn(n, self.dim, generator=self.gen), dim=-1)
        image = F.normalize(MIX[0] * text + MIX[1] * u + MIX[2] * noise, dim=-1)
        tokens = 0.5 * torch.randn(n, self.text_len, self.dim, generator=self.gen) / math.sqrt(self.dim)
        mask = torch.ones(n, self.text_len, dtype=torch.bool)
        return image * self.norm, text * self.norm, (text[:, None] + tokens) * self.norm, mask


def train_one(preset: str, norm: float, reduction: str, args: argparse.Namespace) -> dict:
    """One eclipse run on the stream; the ratio at step 1 and over the last 10 % of the steps."""
    torch.manual_seed(0)
    dim = PRIOR_PRESETS[preset]["embedding_dim"]
    model = build_prior(preset, text_length=args.text_length, num_layers=args.layers)
    params = output_layer_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    stream = PairStream(dim, norm, args.text_length)
    noise_gen = torch.Generator().manual_seed(1)
    ratios, proj_curve, last, clipped = [], [], {}, 0
    tail = max(1, args.steps // 10)
    for step in range(1, args.steps + 1):
        image, text, hidden, mask = stream.next(args.batch_size)
        eps = torch.randn(image.shape, generator=noise_gen)
        pred = model(eps, text, hidden, mask).predicted_image_embedding
        proj = projection_loss(pred, image, reduction)
        cls = DEFAULT_LAMBDA * contrastive_loss(pred, text, DEFAULT_TAU)
        if step == 1 or step > args.steps - tail:
            ratios.append(float(grad_ratio(cls, proj, params)))
        (proj + cls).backward()
        clipped += float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) > 1.0
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        proj_curve.append(float(proj.detach()))
        if step > args.steps - tail:
            last.setdefault("cos", []).append(float(F.cosine_similarity(pred.detach(), image, dim=-1).mean()))
            last.setdefault("cls", []).append(float(cls.detach()) / DEFAULT_LAMBDA)
    fifth = max(1, args.steps // 5)
    before, end = statistics.mean(proj_curve[-2 * fifth:-fifth]), statistics.mean(proj_curve[-fifth:])
    return {"ratio_init": ratios[0], "ratio_end": statistics.median(ratios[1:]), "proj_start": proj_curve[0],
            "proj_end": end, "proj_change": (before - end) / before, "cls_end": statistics.mean(last["cls"]),
            "cos_end": statistics.mean(last["cos"]), "clipped": clipped / args.steps}


def trained(presets: list[str], norms: list[float], args: argparse.Namespace) -> dict[str, float]:
    print(f"\n== after training: eclipse, lambda {DEFAULT_LAMBDA}, tau {DEFAULT_TAU}, {args.steps} steps x batch "
          f"{args.batch_size}, lr {args.lr:g} (one cosine cycle), {args.layers} layers, {args.text_length} text "
          f"tokens; ratio at the output layer; converged: L_proj moved < 5 % over the last 20 % of the run")
    print(f"{'preset':<12}{'D':>6}{'|z|':>5}{'reduce':>7}{'ratio@1':>10}{'ratio@end':>11}{'L_proj@end':>12}"
          f"{'last-20%':>9}{'L_CLS@end':>10}{'cos@end':>9}{'conv.':>6}{'clipped':>8}{'s':>6}")
    figures = {}
    for preset in presets:
        dim = PRIOR_PRESETS[preset]["embedding_dim"]
        for norm in norms:
            for reduction in REDUCTIONS:
                t0 = time.perf_counter()
                r = train_one(preset, norm, reduction, args)
                conv = "yes" if abs(r["proj_change"]) < 0.05 else "no"
                print(f"{preset:<12}{dim:>6}{norm:>5g}{reduction:>7}{r['ratio_init']:>10.3g}{r['ratio_end']:>11.3g}"
                      f"{r['proj_end']:>12.4g}{-r['proj_change']:>+9.1%}{r['cls_end']:>10.3f}{r['cos_end']:>9.3f}"
                      f"{conv:>6}{r['clipped']:>8.0%}{time.perf_counter() - t0:>6.0f}", flush=True)
                figures[f"trained_{preset}_z{norm:g}_{reduction}"] = r["ratio_end"]
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["init", "trained", "both"], default="both")
    ap.add_argument("--presets", nargs="+", default=["kandinsky22", "karlo"], choices=sorted(PRIOR_PRESETS))
    ap.add_argument("--norms", type=float, nargs="+", default=None,
                    help="embedding norms |z| (default: 1 21 40 at init, 1 21 trained)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400, help="trained: steps per run")
    ap.add_argument("--lr", type=float, default=1e-3, help="trained: peak learning rate")
    ap.add_argument("--layers", type=int, default=2, help="trained: transformer layers (released: 10)")
    ap.add_argument("--text-length", type=int, default=REAL_TOKENS, help="trained: text tokens (released: 77)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = {}
    if args.part in ("init", "both"):
        figures |= at_init(args.presets, args.norms or [1.0, 21.0, 40.0], args.batch_size)
    if args.part in ("trained", "both"):
        figures |= trained(args.presets, args.norms or [1.0, 21.0], args)
    for name, value in figures.items():
        print(f"{name}={value:.4g}")


if __name__ == "__main__":
    main()
