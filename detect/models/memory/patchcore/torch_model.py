"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022): inference.

Locally aware patch features: the maps of two (or more) backbone stages are each averaged over their 3x3
neighbourhood (stride 1, padding 1), the deeper maps are upsampled bilinearly to the finest map's resolution,
concatenated, and reduced to ``feature_dim`` channels by adaptive average pooling over the channel axis (done as
one fixed matrix product, identical to ``F.adaptive_avg_pool1d``). A test patch's score is its Euclidean
distance to the nearest feature of the memory bank (a coreset of the normal training patches, chosen in
``detector.k_center_greedy``). The image score is the largest patch score reweighted as in the paper (eq. 7):

    s = (1 - exp(|m_test - m*|) / sum_{m in N_b(m*)} exp(|m_test - m|)) * s*

with m_test the most anomalous test patch, m* its nearest memory feature, s* = |m_test - m*| and N_b(m*) the
``num_neighbors`` nearest memory features of m* (m* itself included, as in Anomalib). The anomaly map is the
patch-score map upsampled bilinearly to the input size and blurred with a Gaussian (sigma 4, fixed kernel).

Patch distances are computed as |x|^2 + min_m(|m|^2 - 2 x.m) in blocks of the distance matrix (one fused
matrix product and a row minimum per block, on features centred by the memory-bank mean to limit float32
cancellation; relative error ~1e-6); the most anomalous patch of each image is then measured exactly against the
whole bank (difference form), which gives s*, m* and the neighbour distances of the reweighting.

``forward`` is plain torch, so it exports (torch.export, tested) and traces. An exact faiss ``IndexFlatL2`` can
replace the torch search (``model.nn_backend = "faiss"``): it is built lazily from the ``memory_bank`` buffer
(rebuilt when the buffer changes), is never used while exporting/tracing, and gives the same scores to float
rounding. While exporting, the search runs as one block (the blocking depends on the batch size, which an exported
graph must not fix) and the exact distances are written out instead of ``cdist`` (which the torch.export-based
ONNX exporter cannot translate); ``tests/test_export.py`` checks the ONNX graph against eager PyTorch. The detector
keeps the torch search by default: faiss was not clearly faster on the 2-core development
CPU (whole inference 1.14x faster at 256 px with a 10_240-entry bank, slower with small banks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor

BLUR_SIGMA = 4.0
SEARCH_BLOCK_ELEMENTS = 1 << 22
"""Rows x memory entries of one block of the distance matrix (16 MiB of float32): bounds memory whatever the
batch and memory-bank sizes; smaller blocks measured slower (per-block overhead), larger ones leave the L3 cache."""


def channel_pooling_matrix(channels: int, dim: int) -> torch.Tensor:
    """(channels, dim) matrix P with ``x @ P == F.adaptive_avg_pool1d(x[:, None], dim)[:, 0]``.

    ``dim >= channels`` gives the identity: pooling to more bins would only repeat channels (more distance
    computation, no information, and an uneven weighting of the repeated channels).
    """
    if dim >= channels:
        return torch.eye(channels)
    return F.adaptive_avg_pool1d(torch.eye(channels).unsqueeze(1), dim).squeeze(1)


def _exporting() -> bool:
    """True while torch.export / torch.compile / ONNX export / jit tracing records the forward."""
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
                or torch.jit.is_tracing() or torch.jit.is_scripting())


class PatchcoreModel(nn.Module):
    """Frozen feature extractor + memory bank; ``forward`` -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, extractor: FeatureExtractor, *, feature_dim: int, num_neighbors: int = 9,
                 blur_sigma: float = BLUR_SIGMA):
        super().__init__()
        # Channels-last convolutions run the (depthwise-heavy) backbones about twice as fast on CPU (oneDNN);
        # load_state_dict copies into these tensors and keeps their layout.
        self.extractor = extractor.to(memory_format=torch.channels_last)
        self.num_neighbors = num_neighbors
        channels = sum(extractor.channels)
        self.feature_dim = min(feature_dim, channels)
        # Derived from the config, so not saved (persistent=False); the memory bank is the fitted state.
        self.register_buffer("channel_pool", channel_pooling_matrix(channels, feature_dim), persistent=False)
        self.register_buffer("memory_bank", torch.zeros(0, self.feature_dim))
        self.smoother = AnomalyMapSmoother(blur_sigma)
        self.nn_backend = "torch"
        self._faiss_index: Any = None
        self._faiss_key: tuple | None = None

    # ----- features -------------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features (N, feature_dim, h, w) at the finest selected stage's resolution."""
        images = images.contiguous(memory_format=torch.channels_last)
        maps = [F.avg_pool2d(f, kernel_size=3, stride=1, padding=1) for f in self.extractor(images)]
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        features = torch.cat(maps, dim=1)
        if self.channel_pool.shape[0] == self.channel_pool.shape[1]:
            return features
        return torch.einsum("nchw,cd->ndhw", features, self.channel_pool)

    @staticmethod
    def to_patches(embedding: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) -> (N * h * w, D), image-major then row-major (the order of the anomaly map)."""
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    # ----- nearest neighbour search ---------------------------------------------------------------------------
    def nearest_torch(self, patches: torch.Tensor) -> torch.Tensor:
        """Squared distance (P,) of each patch to its nearest memory feature: |x|^2 + min_m(|m|^2 - 2 x.m),
        blockwise (bounded memory), on features centred by the memory-bank mean (less cancellation)."""
        bank = self.memory_bank
        mean = bank.mean(0)
        bank = bank - mean
        bank_t = bank.t()
        bank_sq = bank.pow(2).sum(1)
        patches = patches - mean
        rows = max(1, SEARCH_BLOCK_ELEMENTS // max(1, bank.shape[0]))
        # Exported graphs take one block: the blocking depends on the batch size, which a traced/exported graph
        # must not fix (the per-row result is the same; only peak memory differs).
        if _exporting() or patches.shape[0] <= rows:
            nearest = torch.addmm(bank_sq, patches, bank_t, alpha=-2).amin(1)
        else:
            nearest = torch.cat([torch.addmm(bank_sq, chunk, bank_t, alpha=-2).amin(1)
                                 for chunk in patches.split(rows)])
        return (nearest + patches.pow(2).sum(1)).clamp_min(0)

    def nearest_faiss(self, patches: torch.Tensor) -> torch.Tensor:
        """The same squared distances (P,) from an exact faiss IndexFlatL2 (same centring)."""
        index, mean = self.faiss_index()
        query = (patches.detach().float() - mean).contiguous().cpu().numpy()
        squared, _ = index.search(query, 1)
        return torch.from_numpy(squared[:, 0]).to(patches.device).clamp_min(0)

    def faiss_index(self) -> tuple[Any, torch.Tensor]:
        """(faiss IndexFlatL2 of the centred memory bank, the mean), rebuilt when the buffer changed (lazy)."""
        import faiss

        bank = self.memory_bank
        key = (bank.data_ptr(), bank._version, tuple(bank.shape))
        if self._faiss_index is None or self._faiss_key != key:
            mean = bank.detach().float().mean(0)
            index = faiss.IndexFlatL2(bank.shape[1])
            index.add((bank.detach().float() - mean).contiguous().cpu().numpy())
            self._faiss_index, self._faiss_key = (index, mean), key
        return self._faiss_index

    def patch_distances(self, patches: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """Euclidean distance (P,) of each patch to its nearest memory feature (torch or faiss search)."""
        backend = backend or self.nn_backend
        if backend == "faiss" and not _exporting():
            squared = self.nearest_faiss(patches)
        else:
            squared = self.nearest_torch(patches)
        return squared.sqrt()

    # ----- scoring --------------------------------------------------------------------------------------------
    def image_scores(self, patches: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """Paper eq. 7 for each image: s* times 1 - the softmax weight of m* among its b nearest neighbours.

        patches: (N * L, D); distance: (N, L) patch distances. The most anomalous patch's distances to the
        whole memory bank are recomputed exactly (difference form), giving s*, m* and the neighbour distances.
        """
        n = distance.shape[0]
        rows = torch.arange(n, device=distance.device)
        test = patches.reshape(n, -1, patches.shape[-1])[rows, distance.argmax(1)]  # m_test,* (n, D)
        bank = self.memory_bank
        if _exporting():
            # The same difference form written out: the torch.export-based ONNX exporter has no cdist kernel.
            exact = (test.unsqueeze(1) - bank.unsqueeze(0)).pow(2).sum(-1).sqrt()
        else:
            exact = torch.cdist(test, bank, compute_mode="donot_use_mm_for_euclid_dist")  # (n, M)
        s_star, m_index = exact.min(1)
        b = min(self.num_neighbors, bank.shape[0])
        if b < 2:
            return s_star
        # N_b(m*): the b memory features nearest to m*, with m* itself forced first (its term is the numerator).
        m_star = bank[m_index]
        ranking = torch.addmm(bank.pow(2).sum(1), m_star, bank.t(), alpha=-2)
        ranking = ranking.scatter(1, m_index[:, None], float("-inf"))
        support = ranking.topk(b, dim=1, largest=False).indices  # (n, b), support[:, 0] == m_index
        weight = 1.0 - torch.softmax(exact.gather(1, support), dim=1)[:, 0]
        return weight * s_star

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(images)
        n, _, h, w = embedding.shape
        patches = self.to_patches(embedding)
        distance = self.patch_distances(patches).view(n, h * w)
        scores = self.image_scores(patches, distance)
        return scores, self.smoother(distance.view(n, h, w), images.shape[-2:])
