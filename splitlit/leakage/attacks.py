"""The server's attacks, as pure functions of what it receives (and, to score them, what the client knows).

    auc = label_auc_norm(grads, labels)           # Li et al. 2022: the gradient's norm gives the label away
    dcor = distance_correlation(images, acts)     # Vepakomma et al. 2020 (NoPeek): inputs vs activations
    psnr, ssim = reconstruction_scores(decoder(view), images, mean=..., std=...)

Every function takes the batch dimension first and works on a bounded sample (tens of rows): the monitor calls
them every few steps, on the client, where the labels and inputs already are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATTACKS", "distance_correlation", "image_grid", "label_auc_cosine", "label_auc_norm", "make_decoder",
           "per_sample", "reconstruction_scores", "token_candidates", "token_recovery", "train_decoder"]

# The attack names LeakageMonitor accepts, and what each needs.
ATTACKS = {
    "label_auc": "label leakage from the down-cut gradients (norm and cosine scores)",
    "dcor": "distance correlation between the head's inputs and the up-cut activations",
    "recon": "image reconstruction from the up-cut activations by a decoder trained on public images",
    "tokens": "token recovery from the up-cut hidden states (nearest public word embedding)",
}
_ID_DIMS = 16  # dimensions of the fixed random vector each token id stands for in distance_correlation


def per_sample(*tensors: Tensor) -> Tensor:
    """One row per sample: every floating-point tensor flattened after the batch dimension, side by side."""
    rows = [t.reshape(t.shape[0], -1).float() for t in tensors if t.is_floating_point()]
    if not rows:
        raise ValueError("per_sample: no floating-point tensor among the inputs "
                         f"({[str(t.dtype) for t in tensors]}).")
    return torch.cat(rows, dim=1)


def _input_rows(x: Tensor) -> Tensor:
    """Rows for an input: images flattened; token ids position by position, each id a fixed random unit vector,
    so the distance between two sentences grows with the number of positions where their tokens differ."""
    if x.is_floating_point():
        return x.reshape(x.shape[0], -1).float()
    gen = torch.Generator().manual_seed(0)
    table = F.normalize(torch.randn(int(x.max()) + 1, _ID_DIMS, generator=gen), dim=1).to(x.device)
    return table[x.long()].reshape(x.shape[0], -1)


def _u_centred_distances(rows: Tensor) -> Tensor:
    """The U-centred distance matrix of Székely and Rizzo (2014): its products are unbiased."""
    n = rows.shape[0]
    d = torch.cdist(rows, rows)
    u = d - d.sum(0, keepdim=True) / (n - 2) - d.sum(1, keepdim=True) / (n - 2) + d.sum() / ((n - 1) * (n - 2))
    return u * (1 - torch.eye(n, device=rows.device, dtype=u.dtype))


def distance_correlation(x: Tensor, z: Tensor) -> Tensor:
    """Bias-corrected distance correlation between ``x`` and ``z`` (per sample: each flattened), in [0, 1].

    Székely and Rizzo, "Partial distance correlation with methods for dissimilarities" (Ann. Stat. 2014): the
    unbiased estimator of dCor², reported as ``sqrt(max(dCor², 0))``. The plain (biased) sample dCor of NoPeek
    (Vepakomma, Singh, Gupta and Raskar, "NoPeek: Information leakage reduction to share activations in
    distributed deep learning", ICDMW 2020) is far from 0 for independent samples when the dimension is large
    against the sample (0.6 for 64 independent 10-dim pairs; the monitor scores 32 samples of 10^4-10^5 values),
    so it could not tell a defence from no defence; the corrected one is near 0 there and 1 when ``z`` is ``x``
    (or any isometry of it). Integer ``x`` (token ids) is compared position by position (see
    :func:`_input_rows`). Differentiable in both arguments (NoPeek's penalty). Needs 4 samples or more.
    """
    n = x.shape[0]
    if z.shape[0] != n or n < 4:
        raise ValueError(f"distance_correlation: x and z need the same number of samples, at least 4; got "
                         f"{x.shape[0]} and {z.shape[0]}.")
    a = _u_centred_distances(_input_rows(x))
    b = _u_centred_distances(z.reshape(n, -1).float())
    dcov2 = (a * b).sum()
    denom = ((a * a).sum() * (b * b).sum()).sqrt()
    if denom <= 0:
        return torch.zeros((), device=z.device)
    return (dcov2 / denom).clamp(min=0.0).sqrt()


def _auroc(scores: Tensor, positive: Tensor) -> float:
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(scores.float(), positive.long()))


def _per_class(labels: Tensor) -> list[int]:
    """Classes with at least one sample in and one out: the one-vs-rest problems that have an AUC."""
    counts = torch.bincount(labels.long())
    return [c for c in range(len(counts)) if 0 < int(counts[c]) < len(labels)]


def label_auc_norm(grads: Tensor, labels: Tensor) -> float:
    """AUC of recovering the label from the norm of each sample's down-cut gradient ("norm attack").

    Li, Sun, Wang, Zhou, Xu, Zhang, Wang and Wang, "Label Leakage and Protection in Two-party Split Learning"
    (ICLR 2022), section 3.1: with cross-entropy the gradient's norm is larger for the class the model gets wrong
    more often, so the norm alone ranks the samples by label. Binary labels give their binary AUC; more classes
    give each class against the rest, averaged over the classes present (macro one-vs-rest: every class is the
    paper's binary problem once, weighted equally whatever the sample's class balance). The server does not know
    which way a class's norms lean, so each AUC is taken in the attacker's better orientation, ``max(a, 1 - a)``:
    0.5 means nothing leaks, 1 everything. NaN when the sample has a single class.
    """
    norms = grads.reshape(grads.shape[0], -1).float().norm(dim=1)
    classes = _per_class(labels)
    if not classes:
        return float("nan")
    aucs = [_auroc(norms, labels == c) for c in classes]
    return sum(max(a, 1.0 - a) for a in aucs) / len(aucs)


def label_auc_cosine(grads: Tensor, labels: Tensor) -> float:
    """AUC of recovering the label from the direction of each sample's down-cut gradient ("cosine attack").

    Li et al. (ICLR 2022), section 3.2: gradients of samples of the same class point the same way, so the cosine
    similarity with one sample whose label the attacker knows classifies the rest. For each class present, the
    reference is the first sample of that class; the others are scored by their cosine with it and the AUC of
    "same class" is taken (higher cosine = same class, the paper's rule); averaged over classes as in
    :func:`label_auc_norm`. NaN when no class has a reference and both kinds of other samples.
    """
    flat = F.normalize(grads.reshape(grads.shape[0], -1).float(), dim=1)
    aucs = []
    for c in _per_class(labels):
        ref = int((labels == c).nonzero()[0])
        others = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
        others[ref] = False
        same = (labels == c)[others]
        if 0 < int(same.sum()) < len(same):
            aucs.append(_auroc(flat[others] @ flat[ref], same))
    return sum(aucs) / len(aucs) if aucs else float("nan")


# -- reconstruction ------------------------------------------------------------------------------------------------
def make_decoder(in_channels: int, scale: int, *, width: int = 32, out_channels: int = 3) -> nn.Module:
    """The server's decoder from a [C, H/s, W/s] activation to a [3, H, W] image: two 3x3 convs at the
    activation's resolution and a pixel shuffle up by ``scale`` (cheap: it works at the small resolution)."""
    if scale < 1:
        raise ValueError(f"make_decoder(scale={scale}): the image must be at least as large as the activation.")
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, out_channels * scale * scale, 3, padding=1), nn.PixelShuffle(scale))


def train_decoder(public_head: nn.Module, public_images: Tensor, *, steps: int = 150, batch_size: int = 16,
                  lr: float = 2e-3, width: int = 32, seed: int = 0) -> nn.Module:
    """The reconstruction attack's training: a decoder from the public head's outputs back to the public images.

    The "model inversion" attack of He, Zhang and Lee, "Model inversion attacks against collaborative inference"
    (ACSAC 2019), in its query-free form: the server knows the architecture and the public pretrained weights of
    the head, and owns public images (disjoint from the client's), so it trains an inverse network on them and
    applies it to the activations it receives. ``public_images`` are in the model's input space (normalised).
    """
    gen = torch.Generator().manual_seed(seed)
    public_head = public_head.eval()
    with torch.no_grad():
        probe = public_head(public_images[:1])
        probe = probe[0] if isinstance(probe, tuple) else probe
    scale = public_images.shape[-1] // probe.shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = make_decoder(probe.shape[1], scale, width=width, out_channels=public_images.shape[1])
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(len(public_images), (min(batch_size, len(public_images)),), generator=gen)
        images = public_images[idx]
        with torch.no_grad():
            acts = public_head(images)
            acts = acts[0] if isinstance(acts, tuple) else acts
        loss = F.mse_loss(decoder(acts), images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return decoder.eval()


def _pixels(images: Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Tensor:
    """Normalised model inputs back to [0, 1] pixels."""
    if mean is not None and std is not None:
        m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
        images = images * s + m
    return images.float().clamp(0.0, 1.0)


def reconstruction_scores(reconstructed: Tensor, images: Tensor, *, mean: tuple[float, ...] | None = None,
                          std: tuple[float, ...] | None = None) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of reconstructed images against the true ones, on [0, 1] pixels (torchmetrics).

    ``mean``/``std``: the normalisation the model's inputs went through (ImageNet's for MobileNetV2); both
    images are mapped back to pixels and clamped to [0, 1] first.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    fake, real = _pixels(reconstructed, mean, std), _pixels(images, mean, std)
    psnr = peak_signal_noise_ratio(fake, real, data_range=1.0)
    ssim = structural_similarity_index_measure(fake, real, data_range=1.0)
    return float(psnr), float(ssim)


def image_grid(images: Tensor, reconstructed: Tensor, *, mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None, count: int = 8) -> Tensor:
    """A [3, H', W'] grid: the true images on the top row, what the server reconstructs below."""
    from torchvision.utils import make_grid

    n = min(count, len(images))
    both = torch.cat([_pixels(images[:n], mean, std), _pixels(reconstructed[:n], mean, std)])
    return make_grid(both, nrow=n, padding=2)


# -- token recovery ------------------------------------------------------------------------------------------------
def token_candidates(public_head: nn.Module) -> Tensor:
    """The server's dictionary: the public word-embedding matrix (the head's largest ``nn.Embedding``), rows
    normalised. On all-MiniLM-L6-v2 cut after layer 0's self-attention, the nearest row recovers 100% of the
    CoLA dev tokens (the residual connection keeps each token's embedding dominant); pushing the matrix through
    the first layer context-free found the same tokens at six times the cost, so the plain matrix is used."""
    embeddings = [m for m in public_head.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise ValueError(f"token_candidates: the head {type(public_head).__name__} has no nn.Embedding; token "
                         f"recovery needs a text model whose head embeds the token ids (attacks without 'tokens').")
    words = max(embeddings, key=lambda m: m.num_embeddings)
    return F.normalize(words.weight.detach().float(), dim=1)


def token_recovery(hidden: Tensor, input_ids: Tensor, attention_mask: Tensor, candidates: Tensor) -> float:
    """Share of the client's (non-padding) tokens that the nearest candidate (cosine) names correctly.

    Embedding inversion as in Song and Raghunathan, "Information Leakage in Embedding Models" (CCS 2020) and
    Pasquini, Ateniese and Bernaschi, "Unleashing the Tiger: Inference Attacks on Split Learning" (CCS 2021):
    ``hidden`` [B, T, D] is what the server receives, ``candidates`` [V, D] from :func:`token_candidates`.
    """
    keep = attention_mask.bool()
    if not bool(keep.any()):
        return float("nan")
    rows = F.normalize(hidden[keep].float(), dim=1)
    guess = (rows @ candidates.T).argmax(dim=1)
    return float((guess == input_ids[keep]).float().mean())

