"""UniNet inference module: frozen teacher (+ optional adapted target teacher) -> bottleneck -> student decoder.

Wei, Jiang, Xu: "UniNet: A Contrastive Learning-guided Unified Framework with Feature Selection for Anomaly
Detection", CVPR 2025 (official code: github.com/pangdatangtt/UniNet).

- Teachers: the pretrained backbone, three consecutive stages (``layers``, strides s, 2s, 4s). The *source*
  teacher is frozen. The optional *target* teacher starts as a copy of it and is adapted to the domain during
  training (learning rate 1e-6, BatchNorm statistics re-estimated in training mode), as in the paper.
- Bottleneck (trained): Reverse Distillation's multi-scale feature fusion (stages 1 and 2 brought to stage 3's
  resolution by strided 3x3 conv + BN + ReLU, concatenated with stage 3), then a residual stage of the paper's
  split-branch ("attention") bottleneck blocks: the channels are split in two halves, each goes through its own
  3x3 conv-BN-ReLU-3x3 conv-BN branch, the halves are concatenated and projected by a 1x1 conv + BN, plus the
  shortcut. The first block has stride 2 (embedding of 2 * C3 channels at stride 8s).
- Student (trained): Reverse Distillation's decoder (``detect.models.distillation.reverse_distillation``),
  mirroring the teacher: C3, C2, C1 channels at strides 4s, 2s, s.
- With the target teacher, the bottleneck decodes both teachers' features in one batch, and the student's
  reconstruction from the *target* features is compared with the *source* teacher and vice versa (6 maps);
  without it, the student reconstructs the source teacher (3 maps).
- Domain-related feature selection (DFS, trained): per level a learnable channel vector theta (0 at start);
  the student's features are re-weighted by ``softmax_spatial(prior) * (clamp(sigmoid(theta) + 0.5, max=1)
  + spatial mean of prior)``, the prior being the teacher's features, i.e. towards the positions and channels
  the teacher finds salient for this domain. As in the reference code, the training loss compares the selected
  student features, inference the raw ones (``dfs_inference`` applies DFS at inference too).
- Loss (:func:`uninet_loss`, per level): ``lambda * (1 - cos)`` + ``(1 - lambda) * contrastive`` + margins.
  The contrastive term is InfoNCE over positions: the student feature at position p must be closer (cosine /
  temperature) to the teacher feature at p than to the teacher's features at every other position q of the
  same image (the negatives); normal positions are also pushed to a softmax probability of at least
  ``margin``, labeled anomalous positions to at most ``margin / 2`` (the paper's supervised setting). For
  synthetic anomalies (``detector.py``) the anomaly-free original is known: its teacher features are the
  positives and the anomaly's own teacher feature is one more negative at each anomalous position.
- Anomaly map: per compared level ``1 - cos(teacher, student)``, upsampled to the input size, summed, then
  Gaussian-smoothed (sigma 4). Image score: the paper's weighted decision mechanism: per image the mean of the
  top k map values, k = H * W * max(alpha * mean(P), beta), where P are the per-level maxima whose softmax
  probability over the levels is above average (alpha 0.01, beta 3e-5).

Deviations from the paper / reference code:
- DFS prior: the reference takes the softmax of the raw teacher features, which is mild for WideResNet's
  small post-ReLU activations; EfficientNet-Lite0's stage outputs are signed and large (std 6-8, half of the
  channels with a negative mean), so the spatial softmax puts 55-75 % of its mass on one position and the
  ``theta + mean`` factor flips the sign of half the channels: the loss barely falls (8.5 -> 7.9 in 50 epochs)
  and brick image AUROC drops to 0.59-0.84. Here the prior is the channel-normalised teacher feature
  (unit length per position; ``DomainFeatureSelection(normalize=False)`` gives the reference's).
- The positives of synthetic anomalies are the clean original's teacher features (an addition: the reference
  only has labeled anomalies, whose anomaly-free version is unknown); the cosine pull skips labeled
  anomalous positions (the reference pulls every position, anomalous ones included).
- The "7x7" branch of the reference's bottleneck block is re-parameterised into a 3x3 one at initialisation
  (its ``merge_kernel``), so both branches here are plain 3x3.
- The reference's image score takes the top-k of ``max(exp(m - max m)) - exp(m - max m)``; the paper's text
  (and Anomalib's port) take the top-k of the map itself, as here.
- Decoder stages end without a ReLU (see Reverse Distillation: EfficientNet features are signed).

``forward`` is plain torch: exporting the module exports the whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor
from detect.models.distillation.reverse_distillation.torch_model import Decoder, conv_bn, match_size


class SplitBranchBlock(nn.Module):
    """The paper's bottleneck block: two 3x3 branches on the two channel halves, 1x1 projection, residual."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.split = in_channels // 2
        width = max(out_channels // 4, 1)  # per branch; both halves together give out_channels / 2 (ResNet's 4x)
        self.branches = nn.ModuleList([
            nn.Sequential(conv_bn(part, width, 3, stride=stride), conv_bn(width, width, 3, relu=False))
            for part in (self.split, in_channels - self.split)
        ])
        self.project = conv_bn(2 * width, out_channels, 1, relu=False)
        self.shortcut: nn.Module = (conv_bn(in_channels, out_channels, 1, stride=stride, relu=False)
                                    if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = torch.split(x, [self.split, x.shape[1] - self.split], dim=1)
        out = torch.cat([branch(h) for branch, h in zip(self.branches, halves, strict=True)], dim=1)
        return F.relu(self.project(out) + self.shortcut(x))


class UniNetBottleneck(nn.Module):
    """Multi-scale fusion of the three teacher stages + a residual stage of split-branch blocks (stride 2)."""

    def __init__(self, channels: Sequence[int], blocks: int):
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(conv_bn(c1, c2, 3, stride=2), conv_bn(c2, c3, 3, stride=2))
        self.fuse2 = conv_bn(c2, c3, 3, stride=2)
        layers = [SplitBranchBlock(3 * c3, 2 * c3, stride=2)]
        layers += [SplitBranchBlock(2 * c3, 2 * c3) for _ in range(1, blocks)]
        self.embed = nn.Sequential(*layers)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = features
        size = f3.shape[-2:]
        return self.embed(torch.cat([match_size(self.fuse1(f1), size), match_size(self.fuse2(f2), size), f3], dim=1))


class DomainFeatureSelection(nn.Module):
    """DFS: re-weights student features by the teacher's spatial saliency and a learnt per-channel theta."""

    def __init__(self, channels: Sequence[int], normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        # theta 0 -> weight clamp(sigmoid(0) + 0.5, max=1) = 1: training starts from the plain weighting.
        self.thetas = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels])

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``student[i]`` and ``teacher[i]`` pair up; level i uses theta ``i % levels`` (both teachers share)."""
        selected = []
        for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
            theta = torch.clamp(torch.sigmoid(self.thetas[i % len(self.thetas)]) + 0.5, max=1.0)
            n, c, h, w = t.shape
            prior = F.normalize(t, dim=1) if self.normalize else t
            spatial = torch.softmax(prior.reshape(n, c, h * w), dim=-1).reshape(n, c, h, w)
            selected.append(s * spatial * (theta + prior.mean(dim=(-2, -1), keepdim=True)))
        return selected


def level_masks(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, S, S) anomaly masks -> (N, h*w) bool: a feature position is anomalous when any of its pixels is."""
    return F.adaptive_max_pool2d(masks.float().unsqueeze(1), (int(size[0]), int(size[1]))).flatten(1) > 0.5


def uninet_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], *, temperature: float,
                lambda_weight: float = 0.7, margin: float = 1.0, masks: torch.Tensor | None = None,
                clean: Sequence[torch.Tensor] | None = None, repairable: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's loss, summed over levels: ``lambda * cos + (1 - lambda) * contrastive + margin terms``.

    Per level and image, ``P[p, q] = softmax_q(cos(student_p, positive_q) / temperature)`` over the positions q;
    ``P[p, p]`` is the probability of picking the corresponding teacher feature among all positions (the other
    positions are the negatives). Pulled positions: ``lambda * (1 - cos(student_p, positive_p))``,
    ``(1 - lambda) * -log P[p, p]`` and ``relu(margin - P[p, p])``.

    ``masks`` ((N, S, S) bool at the input size; None = all normal) marks anomalous pixels; a feature position
    is anomalous when any of its pixels is. Images flagged ``repairable`` ((N,) bool) are synthetic anomalies
    whose anomaly-free original is known: ``clean`` holds its teacher features (same layout as ``teacher``), the
    positives of every position of the image, and at anomalous positions the teacher's feature of the anomaly
    itself joins the softmax as one more negative (pushed away). Anomalous positions of other images (labeled
    anomalies) get the paper's supervised term only: ``relu(P[p, p] - margin / 2)`` with their own teacher
    features as candidates, pushing the student away from the teacher there.
    """
    total = teacher[0].new_zeros(())
    for level, (t, s) in enumerate(zip(teacher, student, strict=True)):
        n, c, h, w = s.shape
        s_hat = F.normalize(s.reshape(n, c, h * w), dim=1)
        t_hat = F.normalize(t.reshape(n, c, h * w), dim=1)
        anomalous = level_masks(masks, (h, w)) if masks is not None else torch.zeros((n, h * w), dtype=torch.bool,
                                                                                     device=s.device)
        fixable = (repairable.view(n, 1) if repairable is not None and clean is not None
                   else torch.zeros((n, 1), dtype=torch.bool, device=s.device))
        positive = t_hat
        if clean is not None and bool(fixable.any()):
            positive = torch.where(fixable.view(n, 1, 1), F.normalize(clean[level].reshape(n, c, h * w), dim=1), t_hat)
        logits = torch.bmm(s_hat.transpose(1, 2), positive) / temperature  # (N, hw student, hw positive)
        # The anomaly's own teacher feature as an extra negative where a clean positive replaces it.
        pushed = anomalous & fixable
        extra = torch.where(pushed, (s_hat * t_hat).sum(dim=1) / temperature, torch.full_like(logits[..., 0], -1e4))
        log_p = torch.diagonal(torch.log_softmax(torch.cat([logits, extra.unsqueeze(2)], dim=2), dim=2)[..., :h * w],
                               dim1=1, dim2=2)  # (N, hw)
        pulled = ~anomalous | fixable
        if pulled.any():
            p_pulled = log_p[pulled]
            cosine = (s_hat * positive).sum(dim=1)[pulled]
            total = total + lambda_weight * (1.0 - cosine).mean() + (1.0 - lambda_weight) * (-p_pulled).mean() \
                + F.relu(margin - p_pulled.exp()).mean()
        labeled = anomalous & ~fixable
        if labeled.any():  # positive == own teacher features for these images
            total = total + F.relu(log_p[labeled].exp() - margin / 2).mean()
    return total


def weighted_decision_scores(level_maxima: torch.Tensor, maps: torch.Tensor, *, alpha: float, beta: float
                             ) -> torch.Tensor:
    """The paper's weighted decision mechanism: (N, L) per-level map maxima and (N, S, S) maps -> (N,) scores.

    The maxima whose softmax probability over the levels is above average form P; the image score is the mean
    of the ``k = H * W * max(alpha * mean(P), beta)`` largest map values (at least one).
    """
    probs = torch.softmax(level_maxima, dim=1)
    chosen = (probs > probs.mean(dim=1, keepdim=True)).to(level_maxima.dtype)
    # Equal maxima give equal probabilities, none above average: then every level counts.
    chosen = torch.where(chosen.sum(dim=1, keepdim=True) > 0, chosen, torch.ones_like(chosen))
    weight = torch.clamp((level_maxima * chosen).sum(dim=1) / chosen.sum(dim=1) * alpha, min=beta)
    flat = maps.flatten(1)
    count = flat.shape[1]
    k = torch.clamp(torch.floor(weight * count), min=1, max=count)  # (N,)
    ordered = flat.sort(dim=1, descending=True).values
    keep = (torch.arange(count, device=flat.device).unsqueeze(0) < k.unsqueeze(1)).to(flat.dtype)
    return (ordered * keep).sum(dim=1) / k


class UniNetModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, teacher: FeatureExtractor, *, target_teacher: bool = True, bottleneck_blocks: int = 3,
                 decoder_blocks: Sequence[int] = (3, 4, 6), dfs_inference: bool = False, alpha: float = 0.01,
                 beta: float = 3e-5, blur_sigma: float = 4.0):
        super().__init__()
        if len(teacher.channels) != 3:
            raise ValueError("UniNet needs exactly three teacher stages")
        self.teacher = teacher
        self.target: FeatureExtractor | None = None
        if target_teacher:
            self.target = copy.deepcopy(teacher)
            self.target.body.requires_grad_(True)
        self.bottleneck = UniNetBottleneck(teacher.channels, bottleneck_blocks)
        self.student = Decoder(teacher.channels, decoder_blocks)
        self.dfs = DomainFeatureSelection(teacher.channels)
        self.dfs_inference = dfs_inference
        self.alpha = alpha
        self.beta = beta
        self.upsample = AnomalyMapSmoother(sigma=0.0)
        self.smoother = AnomalyMapSmoother(sigma=blur_sigma)

    def reset_target(self) -> None:
        """Start the target teacher again from the source teacher's weights and statistics."""
        if self.target is not None:
            self.target.load_state_dict(self.teacher.state_dict())

    def pairs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher features and the student features compared with them (3 levels, or 6 with the target
        teacher: source vs. the student's reconstruction from the target features, then target vs. source)."""
        with torch.no_grad():
            source = self.teacher(images)
        sizes = [f.shape[-2:] for f in source]
        if self.target is None:
            return list(source), self.student(self.bottleneck(source), sizes)
        target = self.target(images)
        decoded = self.student(self.bottleneck([torch.cat([t, s]) for t, s in zip(target, source, strict=True)]),
                               sizes)
        n = images.shape[0]
        from_target = [d[:n] for d in decoded]
        from_source = [d[n:] for d in decoded]
        return [*source, *target], [*from_target, *from_source]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (images.shape[-2], images.shape[-1])
        teacher, student = self.pairs(images)
        if self.dfs_inference:
            student = self.dfs(student, teacher)
        distances = [1.0 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student, strict=True)]
        level_maxima = torch.stack([d.flatten(1).amax(dim=1) for d in distances], dim=1)
        maps = torch.stack([self.upsample(d, size) for d in distances]).sum(dim=0)
        if self.smoother.sigma > 0:
            maps = self.smoother(maps, size)
        return weighted_decision_scores(level_maxima, maps, alpha=self.alpha, beta=self.beta), maps
