"""Does either term of Eq. 5 swamp the other at initialisation? The released 34M priors, real dims.

    python benchmarks/loss_balance.py [--batch-size 64] [--norms 1 21 40]

For each preset (kandinsky22, D=1280; karlo, D=768) the prior is built at its released size with
the default seed, and fed one batch of synthetic embeddings whose norms are those of real raw
CLIP embeddings: image and text embeddings are random directions scaled to `--norms` (OpenAI's
ViT-L/14 image embeddings have an L2 norm of about 21 in public examples; bigG's is not measured
here, so a range is swept). Each matched text is correlated with its image at cosine ~0.3, as real
CLIP's matched pairs are. Printed per preset and norm, for L_proj (Eq. 3, summed over D) and
lambda * L_CLS (Eq. 4, lambda 0.2, tau 0.07):

  the loss values, the gradient norms w.r.t. all prior parameters, and their ratio
  grad_ratio = ||grad lambda*L_CLS|| / ||grad L_proj||  (1 = balanced; << 1: L_proj rules)

and the same ratio with the mean-over-D form for comparison. AdamW normalises each parameter's
update, so what matters is the direction: the ratio says which term's gradient it follows.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.objectives import DEFAULT_LAMBDA, DEFAULT_TAU, contrastive_loss, projection_loss  # noqa: E402
from training.prior import build_prior  # noqa: E402

TEXT_LEN = 77
REAL_TOKENS = 17  # a typical caption's real tokens


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def batch(dim: int, n: int, norm: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(0.3 * image + (1 - 0.09) ** 0.5 * noise, dim=-1)  # cosine ~0.3
    hidden = torch.randn(n, TEXT_LEN, dim, generator=gen)
    mask = torch.zeros(n, TEXT_LEN, dtype=torch.bool)
    mask[:, :REAL_TOKENS] = True
    return image * norm, text * norm, hidden * mask[..., None], mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--norms", type=float, nargs="+", default=[1.0, 21.0, 40.0])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch_size}, lambda {DEFAULT_LAMBDA}, tau {DEFAULT_TAU}, prior at init (seed 0)")
    print(f"{'preset':<12}{'D':>6}{'|z|':>6}{'L_proj':>10}{'lam*L_CLS':>11}{'|g_proj|':>11}{'|g_cls|':>10}"
          f"{'grad_ratio':>12}{'ratio(mean)':>13}")
    for preset in ("kandinsky22", "karlo"):
        torch.manual_seed(0)
        model = build_prior(preset)
        params = [p for p in model.parameters() if p.requires_grad]
        dim = model.config.embedding_dim
        gen = torch.Generator().manual_seed(0)
        for norm in args.norms:
            image, text, hidden, mask = batch(dim, args.batch_size, norm, gen)
            eps = torch.randn(image.shape, generator=gen)
            pred = model(eps, text, hidden, mask).predicted_image_embedding
            proj = projection_loss(pred, image, "sum")
            proj_mean = projection_loss(pred, image, "mean")
            cls = DEFAULT_LAMBDA * contrastive_loss(pred, text, DEFAULT_TAU)
            g_proj, g_mean, g_cls = grad_norm(proj, params), grad_norm(proj_mean, params), grad_norm(cls, params)
            print(f"{preset:<12}{dim:>6}{norm:>6.0f}{proj.item():>10.2f}{cls.item():>11.3f}{g_proj:>11.3g}"
                  f"{g_cls:>10.3g}{g_cls / g_proj:>12.3g}{g_cls / g_mean:>13.3g}", flush=True)
        print(f"{preset}: |prediction| at init = {pred.norm(dim=-1).mean().item():.2f}")


if __name__ == "__main__":
    main()
