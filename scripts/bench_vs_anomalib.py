"""Reference parity: our models and Anomalib's side by side, same images, size, backbone weights and budget.

Anomalib is not a project dependency; give it a venv that sees the project (as for bench_patchcore.py):

    python -m venv --system-site-packages /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib
    /tmp/anomalib-venv/bin/python scripts/bench_vs_anomalib.py                 # every model with an adapter
    /tmp/anomalib-venv/bin/python scripts/bench_vs_anomalib.py --models padim  # one model

Data (default ../shared/data/magnetic-tile, any MVTec-layout folder with ``--data``): the first ``--train``
train/good images in sorted order; the first ``--good`` test/good and ``--defect`` defect images (round-robin
over the sorted defect classes), decoded and resized once (``bench_patchcore.select_samples`` / ``load_images``).

Each (model, side) runs in its own process (peak RSS is per cell) and writes
``OUT/cells/<model>__<side>.json``; a rerun skips finished cells (resumable across sessions) and the table
``OUT.md`` is rewritten after every cell. Per cell: image AUROC, pixel AUROC, AUPRO (``detect.metrics``, the same
code for both sides), fit s, predict img/s (batch 16, after one warm-up batch), peak RSS.

Our side: ``detect.create(model, image_size=..., seed=0, **budget).fit(images, calibrate=False)``: every
training image is used and no threshold is calibrated, as on Anomalib's side. Anomalib's side: its torch model,
driven as its Lightning module does (train-mode forward to collect embeddings, then its fit step), without
Lightning, on the same tensors, with our resolved Lite0 ImageNet weights loaded into its ``TimmFeatureExtractor``
and its features checked equal to ours (offline: Anomalib cannot download them here), and our normalisation.

Every one of the 21 models gets a row: measured on both sides, or "not comparable offline: <reason>"
(``NOT_COMPARABLE``: a hard-coded backbone or a download Anomalib needs), never a silent gap. What the
measurements say about a row (why it is worse, or that both sides are near chance at the budget) is in
``EXPLAINED``. The quiet-machine rule of ``scripts/quiet_run.py`` marks every cell.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_patchcore import load_images, select_samples  # noqa: E402  (scripts/ is sys.path[0] here)
from quiet_run import LoadWatch  # noqa: E402

from synth.core.io import write_json, write_text  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "magnetic-tile"
DEFAULT_OUT = REPO / "scripts" / "results" / "bench_vs_anomalib"
# Every model Anomalib 2.x also implements (issue 19), in table order.
MODELS = ("padim", "patchcore", "dfkde", "dfm", "cfa", "cflow", "fastflow", "csflow", "uflow", "stfpm",
          "reverse_distillation", "fre", "efficientad", "ganomaly", "draem", "dsr", "supersimplenet", "uninet",
          "dinomaly", "winclip", "vlm_ad")
BATCH = 16


# ----- Anomalib adapters: build(ours_detector, args) -> model; fit(model, batches); predict(model, batch) ----------

def _load_and_check(ours_extractor: Any, their_body: Any, their_features: Callable[[Any], list], size: int) -> None:
    """Load our backbone weights into Anomalib's timm body and check both give the same features."""
    import torch

    their_body.load_state_dict({k: v.contiguous() for k, v in ours_extractor.body.state_dict().items()},
                               strict=True)
    their_body.eval()  # timm builds in train mode; every Anomalib model runs its frozen backbone in eval mode
    check = torch.rand(2, 3, size, size)
    with torch.no_grad():
        mine = ours_extractor(check)
        theirs = their_features((check - ours_extractor.mean) / ours_extractor.std)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.contiguous(), b.contiguous(), rtol=1e-3, atol=1e-4)


def _timm_features_equal(ours_extractor: Any, theirs_extractor: Any, size: int) -> None:
    """The same check for Anomalib's ``TimmFeatureExtractor`` (a dict of features, one per layer)."""
    _load_and_check(ours_extractor, theirs_extractor.feature_extractor,
                    lambda x: list(theirs_extractor(x).values()), size)


@contextlib.contextmanager
def _timm_offline(substitute: dict[str, Callable[..., Any]] | None = None) -> Iterator[None]:
    """Build Anomalib's timm models without their (unreachable) pretrained download; the weights are ours, loaded
    after construction. ``substitute`` maps a backbone name Anomalib hard-codes to a builder of ours (FastFlow)."""
    import timm

    original = timm.create_model

    def create_model(name: str, *args: Any, **kwargs: Any) -> Any:
        kwargs["pretrained"] = False
        if substitute and name in substitute:
            return substitute[name](*args, **kwargs)
        return original(name, *args, **kwargs)

    with mock.patch.object(timm, "create_model", create_model):
        yield


def _lightning(cls: Any, **kwargs: Any) -> Any:
    """An Anomalib Lightning module without its pre/post-processing (our tensors are normalised already)."""
    kwargs.setdefault("pre_processor", False)
    return cls(post_processor=False, evaluator=False, visualizer=False, **kwargs)


def _padim(ours: Any, size: int) -> Any:
    from anomalib.models.image.padim.torch_model import PadimModel

    config = ours.config
    model = PadimModel(backbone=config.backbone, layers=list(config.layers), pre_trained=False,
                       n_features=config.n_features)
    _timm_features_equal(ours.model.extractor, model.feature_extractor, size)
    # The same random channel subset as ours: what remains to differ is the implementation.
    model.idx = ours.model.index.clone()
    return model


def _patchcore(ours: Any, size: int) -> Any:
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    config = ours.config
    model = PatchcoreModel(layers=list(config.layers), backbone=config.backbone, pre_trained=False,
                           num_neighbors=config.num_neighbors)
    _timm_features_equal(ours.model.extractor, model.feature_extractor, size)
    model.coreset_ratio = config.coreset_ratio  # read by the fit step below
    return model


def _dfm(ours: Any, size: int) -> Any:
    from anomalib.models.image.dfm.torch_model import DFMModel

    config = ours.config
    (layer,) = config.layers
    model = DFMModel(backbone=config.backbone, layer=layer, pre_trained=False,
                     pooling_kernel_size=config.pooling_kernel, n_comps=config.pca_level,
                     score_type=config.score_type)
    _timm_features_equal(ours.model.extractor, model.feature_extractor, size)
    return model


def _dfkde(ours: Any, size: int) -> Any:
    from anomalib.models.image.dfkde.torch_model import DfkdeModel

    config = ours.config
    model = DfkdeModel(layers=list(config.layers), backbone=config.backbone, pre_trained=False,
                       n_pca_components=config.n_components, feature_scaling_method=config.feature_scaling,
                       max_training_points=config.max_training_points)
    _timm_features_equal(ours.model.extractor, model.feature_extractor, size)
    return model


def _fit_embedding_model(model: Any, batches: list) -> None:
    """PaDiM / PatchCore / DFM / DFKDE: train-mode forward collects embeddings, then the model's own fit step."""
    import torch

    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    if hasattr(model, "subsample_embedding"):
        model.subsample_embedding(model.coreset_ratio)
    else:
        model.fit()
    model.eval()


def _stfpm(ours: Any, size: int) -> Any:
    from anomalib.models.image.stfpm.lightning_model import Stfpm

    config = ours.config
    with _timm_offline():  # Anomalib builds its teacher pretrained=True (a download)
        module = _lightning(Stfpm, backbone=config.backbone, layers=list(config.layers))
    _timm_features_equal(ours.model.teacher, module.model.teacher_model, size)
    module.epochs = config.epochs
    return module


def _fre(ours: Any, size: int) -> Any:
    import torch
    from anomalib.models.image.fre.lightning_model import Fre

    config = ours.config
    (layer,) = config.layers
    with torch.no_grad():  # the tied autoencoder's input: the pooled, flattened feature map
        probe = ours.model.extractor(torch.zeros(1, 3, size, size))[0]
        input_dim = torch.nn.functional.avg_pool2d(probe, config.pooling).numel()
    module = _lightning(Fre, backbone=config.backbone, layer=layer, pre_trained=False,
                        pooling_kernel_size=config.pooling, input_dim=input_dim, latent_dim=config.latent_dim)
    _timm_features_equal(ours.model.extractor, module.model.feature_extractor, size)
    module.epochs = config.epochs
    return module


def _fastflow(ours: Any, size: int) -> Any:
    import timm
    from anomalib.models.image.fastflow.lightning_model import Fastflow

    config = ours.config
    # Anomalib's FastFlow accepts only resnet18 / wide_resnet50_2 / CaiT / DeiT: build its CNN branch (timm
    # features_only, trainable LayerNorms, one flow per level) around our backbone and levels instead.
    create = timm.create_model

    def lite0(*args: Any, **kwargs: Any) -> Any:
        kwargs["out_indices"] = list(config.layers)
        return create(config.backbone, *args, **kwargs)

    with _timm_offline({"resnet18": lite0}):
        module = _lightning(Fastflow, backbone="resnet18", pre_trained=False, flow_steps=config.flow_steps,
                            conv3x3_only=config.conv3x3_only, hidden_ratio=config.hidden_ratio,
                            pre_processor=Fastflow.configure_pre_processor(image_size=(size, size)))
    body = module.model.feature_extractor
    _load_and_check(ours.model.feature_extractor, body, body, size)
    module.epochs = config.epochs
    return module


def _our_extractor(ours: Any) -> Any:
    """Our model's (frozen, pretrained) backbone feature extractor, whatever the model calls it."""
    for name in ("extractor", "teacher", "feature_extractor"):
        if hasattr(ours.model, name):
            return getattr(ours.model, name)
    raise AttributeError(f"{type(ours.model).__name__} has no backbone feature extractor")


def _cfa(ours: Any, size: int) -> Any:
    import timm
    import torch
    from anomalib.models.image.cfa import torch_model as cfa_model
    from anomalib.models.image.cfa.lightning_model import Cfa

    config = ours.config
    names = cfa_model.get_return_nodes("resnet18")

    class Levels(torch.nn.Module):
        """Anomalib's CFA extractor contract ({return node: features}) around our backbone and levels."""

        def __init__(self) -> None:
            super().__init__()
            self.body = timm.create_model(config.backbone, pretrained=False, features_only=True,
                                          out_indices=list(config.layers))

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return dict(zip(names, self.body(x), strict=True))

    levels = Levels().eval()
    # Anomalib's CFA takes only torchvision resnet18 / wide_resnet50_2 / vgg19_bn (ImageNet download): its own
    # model, loss and descriptor around our backbone; the descriptor's 1x1 CoordConv sized to our channels.
    with mock.patch.object(cfa_model, "get_feature_extractor", lambda backbone, return_nodes: levels):
        module = _lightning(Cfa, backbone="resnet18", gamma_c=config.gamma_c, gamma_d=config.gamma_d,
                            num_nearest_neighbors=config.k_nearest,
                            num_hard_negative_features=config.j_repulsion, radius=config.radius)
    dim = sum(levels.body.feature_info.channels())
    module.model.descriptor.layer = cfa_model.CoordConv2d(in_channels=dim, out_channels=dim // config.gamma_d,
                                                          kernel_size=1)
    _load_and_check(ours.model.feature_extractor, levels.body, levels.body, size)
    # Anomalib 2.7 builds the radius as a non-leaf tensor (torch.ones(1, requires_grad=True) * r) that no optimiser
    # holds, so the second training step fails ("backward through the graph a second time"): a constant, as used.
    module.loss.radius = module.loss.radius.detach()
    module.model.radius = module.model.radius.detach()
    module.epochs = config.epochs
    return module


def _cflow(ours: Any, size: int) -> Any:
    from anomalib.models.image.cflow.lightning_model import Cflow

    config = ours.config
    module = _lightning(Cflow, backbone=config.backbone, layers=list(config.layers), pre_trained=False,
                        fiber_batch_size=config.fiber_batch_size, condition_vector=config.condition_vector,
                        coupling_blocks=config.coupling_blocks, clamp_alpha=config.clamp,
                        permute_soft=config.permute_soft, lr=config.lr)
    _timm_features_equal(_our_extractor(ours), module.model.encoder, size)
    # Anomalib's step raises when a batch has fewer fibers than fiber_batch_size (the last, short batch of an
    # epoch): that batch is dropped on its side (a DataLoader's drop_last).
    module.drop_last = True
    module.epochs = config.epochs
    return module


def _ganomaly(ours: Any, size: int) -> Any:
    from anomalib.models.image.ganomaly.lightning_model import Ganomaly

    config = ours.config
    module = _lightning(Ganomaly, batch_size=BATCH, n_features=config.width, latent_vec_size=config.latent_dim,
                        extra_layers=config.extra_layers, wadv=config.w_adv, wcon=config.w_con,
                        wenc=config.w_enc, lr=config.lr, beta1=config.beta1, beta2=config.beta2,
                        pre_processor=Ganomaly.configure_pre_processor(image_size=(size, size)))
    module.epochs = config.epochs
    return module


def _draem(ours: Any, size: int) -> Any:
    import tempfile

    import torch
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    from anomalib.models.image.draem import torch_model as draem_model
    from anomalib.models.image.draem.lightning_model import Draem

    from detect.models.reconstruction.draem import detector as draem_detector

    # Anomalib's DRAEM downloads DTD as its anomaly source when the folder is missing; ours defaults to no
    # external source (anomaly_source=None). Both sides: Perlin masks without DTD textures.
    config = ours.config
    module = _lightning(Draem, dtd_dir=tempfile.mkdtemp(prefix="no-dtd-"))
    module.augmenter = PerlinAnomalyGenerator(anomaly_source_path=None, blend_factor=tuple(config.beta_range))
    # The same networks and schedule on both sides: Anomalib hard-codes base widths 128 / 64 and Adam 1e-4 with
    # MultiStepLR at epochs 400 / 600 (of the paper's 700); ours defaults to widths 32 / 16 and lr 1e-3 for short
    # CPU schedules. Their sub-networks at our widths, their optimiser at our learning rate and milestones.
    module.model.reconstructive_subnetwork = draem_model.ReconstructiveSubNetwork(
        base_width=config.reconstructive_width)
    module.model.discriminative_subnetwork = draem_model.DiscriminativeSubNetwork(
        in_channels=6, out_channels=2, base_width=config.discriminative_width)

    def configure_optimizers() -> tuple[list[Any], list[Any]]:
        optimizer = torch.optim.Adam(params=module.model.parameters(), lr=config.lr)
        milestones = sorted({max(1, int(f * config.epochs)) for f in draem_detector.LR_MILESTONES})
        return [optimizer], [torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones,
                                                                  gamma=draem_detector.LR_GAMMA)]

    module.configure_optimizers = configure_optimizers
    module.epochs = config.epochs
    return module


def _uflow(ours: Any, size: int) -> Any:
    from anomalib.models.image.uflow import torch_model as uflow_model
    from anomalib.models.image.uflow.feature_extraction import LayerNormFeatureExtractor
    from anomalib.models.image.uflow.lightning_model import Uflow
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Resize

    config = ours.config

    def lite0(backbone: str, input_size: tuple[int, int] = (256, 256)) -> Any:
        # Anomalib's U-Flow takes only MS-CaiT / resnet18 / wide_resnet50_2: its CNN extractor (LayerNorm per
        # level) around our backbone and levels.
        with _timm_offline():
            return LayerNormFeatureExtractor(config.backbone, input_size, layers=tuple(config.layers)).eval()

    with mock.patch.object(uflow_model, "get_feature_extractor", lite0):
        module = _lightning(Uflow, backbone="resnet18", flow_steps=config.flow_steps, affine_clamp=config.clamp,
                            affine_subnet_channels_ratio=config.hidden_ratio, permute_soft=config.permute_soft,
                            # Anomalib fixes U-Flow's input at 448 px; both sides here run at the bench size.
                            pre_processor=PreProcessor(transform=Resize((size, size), antialias=True)))
    body = module.model.feature_extractor.feature_extractor
    _load_and_check(ours.model.feature_extractor, body, body, size)
    module.epochs = config.epochs
    return module


def _supersimplenet(ours: Any, size: int) -> Any:
    from anomalib.models.image.supersimplenet.lightning_model import Supersimplenet

    config = ours.config
    with _timm_offline():
        module = _lightning(Supersimplenet, backbone=config.backbone, layers=list(config.layers))
    _timm_features_equal(ours.model.feature_extractor, module.model.feature_extractor.feature_extractor, size)
    module.epochs = config.epochs
    return module


def _input_normalisation(ours: Any, name: str) -> tuple[Any, Any]:
    """What both sides' networks see: our backbone's normalisation, or the range the from-scratch model uses."""
    if name == "ganomaly":  # tanh generator: [-1, 1]
        return 0.5, 0.5
    if name == "draem":  # reconstructs raw [0, 1] images
        return 0.0, 1.0
    extractor = _our_extractor(ours)
    return extractor.mean, extractor.std


class _Batch:
    """What Anomalib's ``training_step`` reads of a batch."""

    def __init__(self, image: Any) -> None:
        import torch

        self.image = image
        self.gt_mask = None  # normal images only: no masks, every label 0 (SuperSimpleNet reads both)
        self.gt_label = torch.zeros(len(image))


def _fit_lightning(module: Any, batches: list) -> None:
    """Trained models: Anomalib's own ``configure_optimizers`` and ``training_step`` (manual-optimisation modules
    step their own optimizers), our epoch count and batch size, reshuffled every epoch (a seeded generator),
    epoch-interval schedulers stepped once per epoch (Lightning's default), no gradient clipping (their trainer
    arguments)."""
    import torch

    # What configure_optimizers reads of a Trainer (SuperSimpleNet's milestones); no Trainer is attached.
    module._trainer = types.SimpleNamespace(max_epochs=module.epochs, max_steps=-1)
    configured = module.configure_optimizers()
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    if isinstance(configured, tuple) and len(configured) == 2 and isinstance(configured[1], list):
        optimizers, schedulers = list(configured[0]), configured[1]
    else:
        optimizers = list(configured) if isinstance(configured, list | tuple) else [configured]
        schedulers = []
    manual = not module.automatic_optimization
    if not manual:
        (optimizer,) = optimizers
    # Without a Trainer: the hooks a training step calls, here.
    module.log = module.log_dict = lambda *args, **kwargs: None
    module.optimizers = lambda: optimizers[0] if len(optimizers) == 1 else optimizers
    module.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    images = torch.cat(batches)
    if hasattr(module.model, "initialize_centroid"):  # CFA's on_train_start
        module.model.initialize_centroid(data_loader=[_Batch(batch) for batch in batches])
    generator = torch.Generator().manual_seed(module.seed)
    module.model.train()
    for _ in range(module.epochs):
        for step, index in enumerate(torch.randperm(len(images), generator=generator).split(module.train_batch)):
            if len(index) < module.train_batch and getattr(module, "drop_last", False):
                continue
            out = module.training_step(_Batch(images[index]), step)
            if not manual:
                optimizer.zero_grad()
                out["loss"].backward()
                optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    module.model.eval()


# Anomalib side: model name -> builder (ours, size) -> its torch model (embedding models) or Lightning module.
ADAPTERS: dict[str, Callable[[Any, int], Any]] = {
    "padim": _padim,
    "patchcore": _patchcore,
    "dfkde": _dfkde,
    "dfm": _dfm,
    "fastflow": _fastflow,
    "stfpm": _stfpm,
    "fre": _fre,
    "cfa": _cfa,
    "cflow": _cflow,
    "ganomaly": _ganomaly,
    "draem": _draem,
    "uflow": _uflow,
    "supersimplenet": _supersimplenet,
}
# The same budget on both sides (our config; Anomalib's side reads the epoch count from it).
BUDGET: dict[str, dict[str, Any]] = {"stfpm": {"epochs": 20}, "fre": {"epochs": 100}, "fastflow": {"epochs": 10},
                                     "cfa": {"epochs": 10}, "cflow": {"epochs": 10}, "ganomaly": {"epochs": 10},
                                     "draem": {"epochs": 15}, "uflow": {"epochs": 10},
                                     "supersimplenet": {"epochs": 20}}
# Rows that cannot be compared on this machine, with the reason (never a silent gap).
NOT_COMPARABLE: dict[str, str] = {
    "csflow": "not comparable offline: Anomalib's CS-Flow hard-codes torchvision EfficientNet-B5 (features.6.8, "
              "304 channels at strides 32/64) into its flow graph; no B5 ImageNet weights offline, and a Lite0 "
              "substitute would change the flow's input shapes",
    "reverse_distillation": "not comparable offline: Anomalib builds its one-class bottleneck and decoder for the "
                            "ResNet family only (get_decoder / get_bottleneck_layer); no ResNet ImageNet weights "
                            "offline, ours runs on tf_efficientnet_lite0",
    "efficientad": "not comparable offline: Anomalib's EfficientAD downloads its pretrained PDN teacher and "
                   "ImageNette (penalty images) at fit time",
    "dsr": "not comparable offline: Anomalib's DSR downloads its pretrained VQ-VAE weights at fit time",
    "uninet": "not comparable offline: Anomalib's UniNet teachers are torchvision wide_resnet50_2 with ImageNet "
              "weights (download); its decoder is built for that ResNet",
    "dinomaly": "not comparable offline: both sides need DINOv2 ViT-S/14 weights (hub download); a random "
                "encoder would compare two untrained networks",
    "winclip": "not comparable offline: both sides need OpenCLIP ViT-B-16-plus-240 laion400m weights (hub "
               "download)",
    "vlm_ad": "not comparable offline: both sides call a hosted vision-language model (API and key)",
}
# What the measurements say about a row: why it is worse by more than 2 points, or that a model is near chance at
# this budget on both sides (from the quiet run in scripts/results/bench_vs_anomalib.md; see the README).
EXPLAINED: dict[str, str] = {
    "dfm": "image AUROC -5.4 is a deviation by design, not a bug: Anomalib fits one PCA to whole flattened maps "
           "(one C*H*W vector per image, 50 vectors), which models where things lie on these aligned tiles; ours "
           "fits one PCA shared by every position (detect/models/memory/dfm/torch_model.py), which localises "
           "(pixel AUROC +2.3). Not the image-score aggregation: the mean of our map gives 0.702, its max 0.696 "
           "(an ad-hoc check, not in scripts/results)",
    "ganomaly": "near chance on both sides at 10 epochs on 50 images (0.53 / 0.49)",
    "draem": "near chance on both sides at 15 epochs on 50 images (image AUROC 0.57 / 0.52)",
    "supersimplenet": "Anomalib's side is near or below chance at 20 epochs on 50 images (image 0.49, pixel 0.40); "
                      "ours learns (0.63 / 0.73)",
    "uflow": "Anomalib's side is near chance at image level at 10 epochs (0.48); its AUPRO is 4 points above ours",
}
# Image-level models on both sides: no pixel metrics.
IMAGE_LEVEL = frozenset({"dfkde"})
# Deviations forced on Anomalib's side, printed in its row.
SUBSTITUTES: dict[str, str] = {
    "fastflow": "backbone substituted: Anomalib's FastFlow takes only resnet18/wide_resnet50_2/CaiT/DeiT, so its "
                "CNN branch is built around tf_efficientnet_lite0 levels 1-3 (same weights as ours)",
    "dfkde": "image-level model on both sides (Anomalib returns no anomaly map)",
    "cfa": "backbone substituted: Anomalib's CFA takes only torchvision resnet18/wide_resnet50_2/vgg19_bn, so its "
           "model, loss and descriptor run on tf_efficientnet_lite0 levels 1-3 (descriptor sized to 176 channels)",
    "uflow": "backbone substituted: Anomalib's U-Flow takes only MS-CaiT/resnet18/wide_resnet50_2, so its "
             "LayerNorm CNN extractor runs on tf_efficientnet_lite0 levels 1-3 (same weights as ours), at the bench "
             "size (Anomalib fixes 448 px)",
    "cflow": "Anomalib's training step raises on a batch with fewer fibers than fiber_batch_size, so its side "
             "drops each epoch's last, short batch",
    "ganomaly": "image-level on Anomalib's side (no anomaly map)",
    "draem": "no DTD texture source on either side (Anomalib would download it): Perlin anomalies from the "
             "image itself; Anomalib's sub-networks at our widths 32 / 16 and its Adam at our lr 1e-3 and "
             "milestones (it hard-codes 128 / 64 and 1e-4)",
}


# ----- one cell ------------------------------------------------------------------------------------------------

def run_seed(model_name: str, side: str, seed: int, train: Any, test: Any, size: int) -> dict[str, Any]:
    """Fit and predict one model on one side with one seed: scores, maps, fit s, predict img/s."""
    import torch

    import detect

    torch.manual_seed(seed)
    ours = detect.create(model_name, image_size=size, seed=seed, **BUDGET.get(model_name, {}))
    if side == "ours":
        arrays = list((train.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        test_arrays = list((test.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        start = time.perf_counter()
        ours.fit(arrays, calibrate=False, progress=False)
        fit_s = time.perf_counter() - start
        ours.predict(test_arrays[:BATCH])  # warm-up
        start = time.perf_counter()
        prediction = ours.predict(test_arrays, batch_size=BATCH)
        predict_ips = len(test_arrays) / (time.perf_counter() - start)
        return {"scores": prediction.scores, "maps": prediction.anomaly_maps, "fit_s": fit_s,
                "predict_ips": predict_ips}
    torch.manual_seed(seed)  # Anomalib's random initialisations and sampling draw from the global generator
    model = ADAPTERS[model_name](ours, size)
    trained = hasattr(model, "training_step")  # a Lightning module (a trained model), else an embedding model
    if trained:  # our batch size and seed, as our side trains with
        model.train_batch = ours.config.batch_size
        model.seed = seed
    net = model.model if trained else model
    fit = _fit_lightning if trained else _fit_embedding_model
    mean, std = _input_normalisation(ours, model_name)
    start = time.perf_counter()
    fit(model, [(b - mean) / std for b in train.split(BATCH)])
    fit_s = time.perf_counter() - start

    @torch.no_grad()
    def predict(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        out_scores, out_maps = [], []
        for batch in images.split(BATCH):
            out = net((batch - mean) / std)
            out_scores.append(out.pred_score.reshape(-1).numpy())
            if out.anomaly_map is not None:  # DFKDE and GANomaly are image-level
                out_maps.append(out.anomaly_map.reshape(len(batch), *batch.shape[-2:]).numpy())
        return np.concatenate(out_scores), np.concatenate(out_maps) if out_maps else None

    predict(test[:BATCH])  # warm-up
    start = time.perf_counter()
    scores, maps = predict(test)
    return {"scores": scores, "maps": maps, "fit_s": fit_s, "predict_ips": len(test) / (time.perf_counter() - start)}


def run_cell(model_name: str, side: str, args: argparse.Namespace) -> dict:
    """One (model, side): every seed in this process; metrics per seed, mean +- std, median timings."""
    from detect.data import resize_mask
    from detect.metrics import aupro, auroc

    data, train_samples, test_samples = select_samples(args.data, args.train, args.good, args.defect)
    train = load_images(data, train_samples, args.image_size)
    test = load_images(data, test_samples, args.image_size)
    labels = np.array([s.is_anomalous for s in test_samples])
    masks = np.stack([resize_mask(data.load_mask(s), args.image_size) for s in test_samples])
    cell: dict[str, Any] = {"model": model_name, "side": side, "train": len(train_samples),
                            "test": len(test_samples), "image_size": args.image_size, "seeds": args.seeds,
                            "budget": BUDGET.get(model_name, {}), "per_seed": []}
    for seed in range(args.seeds):
        out = run_seed(model_name, side, seed, train, test, args.image_size)
        maps = None if model_name in IMAGE_LEVEL else out["maps"]
        cell["per_seed"].append({
            "seed": seed, "image_auroc": auroc(out["scores"], labels),
            "pixel_auroc": None if maps is None else auroc(maps, masks),
            "aupro": None if maps is None else aupro(maps, masks),
            "fit_s": out["fit_s"], "predict_ips": out["predict_ips"]})
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        values = [row[key] for row in cell["per_seed"] if row[key] is not None]
        cell[key] = float(np.mean(values)) if values else None
        cell[f"{key}_std"] = float(np.std(values)) if values else None
    for key in ("fit_s", "predict_ips"):
        cell[key] = float(np.median([row[key] for row in cell["per_seed"]]))
    cell["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return cell


# ----- the table ---------------------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("" if value is None else str(value))


def fmt_std(cell: dict, key: str) -> str:
    """mean +- std over the seeds ("" when the side has no such metric)."""
    if cell.get(key) is None:
        return ""
    std = cell.get(f"{key}_std")
    return fmt(cell[key]) if not std else f"{cell[key]:.3f} ± {std:.3f}"


def verdict(ours: dict, theirs: dict) -> str:
    """Ours - Anomalib in AUROC points (image / pixel), and whether ours is within 2 points or better."""
    parts, worse = [], []
    for key, label in (("image_auroc", "image"), ("pixel_auroc", "pixel")):
        if ours.get(key) is None or theirs.get(key) is None:
            parts.append("n/a")
            continue
        diff = 100 * (ours[key] - theirs[key])
        parts.append(f"{diff:+.1f}")
        # Worse by more than 2 points, beyond the two sides' seed spread together, needs an explanation.
        spread = 100 * ((ours.get(f"{key}_std") or 0.0) ** 2 + (theirs.get(f"{key}_std") or 0.0) ** 2) ** 0.5
        if diff < -2 and diff < -spread:
            worse.append(label)
    return " / ".join(parts) + (f" — worse ({', '.join(worse)})" if worse else "")


def markdown(cells: dict[tuple[str, str], dict], args: argparse.Namespace) -> str:
    lines = ["# Ours vs Anomalib, same images, size, weights and budget (`scripts/bench_vs_anomalib.py`)", "",
             f"Data: {args.data} — first {args.train} train/good, {args.good} good + {args.defect} defect test "
             f"images; {args.image_size} px; tf_efficientnet_lite0 with the same ImageNet weights on both sides "
             "(features checked equal); our models with `calibrate=False` (all training images, no threshold). "
             f"Metrics: mean ± std over {args.seeds} seeds (0..{args.seeds - 1}, the same on both sides); fit s and "
             "predict img/s: median over the seeds. Trained models: the same epochs and batch size on both sides "
             "(`budget`).",
             "Each cell is its own process; `load` is the largest 1-minute load average during that cell and "
             "LOADED marks a cell that broke the quiet rule (`scripts/quiet_run.py`).", "",
             "| model | side | image AUROC | pixel AUROC | AUPRO | fit s | predict img/s | peak RSS MB | load | "
             "ours - Anomalib, image / pixel AUROC points; notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in (m for m in MODELS if m in args.models):  # table order, whatever order the cells ran in
        ours, theirs = cells.get((name, "ours")), cells.get((name, "anomalib"))
        if name in NOT_COMPARABLE:
            lines.append(f"| {name} | | {NOT_COMPARABLE[name]} | | | | | | | |")
            continue
        if name not in ADAPTERS:
            lines.append(f"| {name} | | not compared yet: no Anomalib adapter in this script | | | | | | | |")
            continue
        diff = ""
        if ours and theirs and "error" not in ours and "error" not in theirs:
            diff = verdict(ours, theirs)
        notes = "; ".join(note for note in (SUBSTITUTES.get(name), EXPLAINED.get(name)) if note)
        budget = ", ".join(f"{k} {v}" for k, v in BUDGET.get(name, {}).items())
        for side, cell in (("ours", ours), ("anomalib", theirs)):
            if cell is None:
                lines.append(f"| {name} | {side} | not run yet | | | | | | | |")
            elif "error" in cell:
                lines.append(f"| {name} | {side} | failed: {cell['error']} | | | | | | | |")
            else:
                extra = diff if side == "ours" else "; ".join(x for x in (f"budget: {budget}" if budget else "",
                                                                          notes) if x)
                lines.append(f"| {name} | {side} | {fmt_std(cell, 'image_auroc')} | {fmt_std(cell, 'pixel_auroc')} | "
                             f"{fmt_std(cell, 'aupro')} | {fmt(cell['fit_s'], 1)} | {fmt(cell['predict_ips'], 1)} | "
                             f"{fmt(cell['peak_rss_mb'], 0)} | {cell['load']['load_average_max']:.2f}"
                             f"{'' if cell['load']['quiet'] else ' LOADED'} | {extra} |")
    return "\n".join(lines) + "\n"


def _finished(path: Path, args: argparse.Namespace) -> bool:
    """A cell is done when its file exists and was measured with this run's data, sizes, seeds and budget."""
    if not path.is_file():
        return False
    cell = json.loads(path.read_text(encoding="utf-8"))
    if "error" in cell:
        return True  # the row shows the error; delete the file to retry
    return (cell.get("seeds"), cell.get("train"), cell.get("test"), cell.get("image_size"), cell.get("budget")) == (
        args.seeds, args.train, args.good + args.defect, args.image_size, BUDGET.get(cell["model"], {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--train", type=int, default=50)
    parser.add_argument("--good", type=int, default=25)
    parser.add_argument("--defect", type=int, default=25)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell, the same on both sides")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cell", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)  # one cell, here
    args = parser.parse_args()
    cells_dir = args.out / "cells"
    if args.cell:
        name, side = args.cell
        with LoadWatch() as watch:
            try:
                cell = run_cell(name, side, args)
            except Exception as exc:  # noqa: BLE001 - the row carries the error a user would see
                cell = {"model": name, "side": side, "error": f"{type(exc).__name__}: {exc}"}
        write_json(cells_dir / f"{name}__{side}.json", {**cell, "load": watch.record()})
        return
    cells: dict[tuple[str, str], dict] = {}
    for name in args.models:
        for side in ("ours", "anomalib") if name in ADAPTERS else ():
            path = cells_dir / f"{name}__{side}.json"
            if not _finished(path, args):
                print(f"{name} / {side} ...", flush=True)
                command = [sys.executable, __file__, "--cell", name, side, "--data", str(args.data),
                           "--train", str(args.train), "--good", str(args.good), "--defect", str(args.defect),
                           "--image-size", str(args.image_size), "--seeds", str(args.seeds),
                           "--out", str(args.out)]
                subprocess.run(command, check=True, cwd=REPO)
            cells[(name, side)] = json.loads(path.read_text(encoding="utf-8"))
            write_text(args.out.with_suffix(".md"), markdown(cells, args))
    write_text(args.out.with_suffix(".md"), markdown(cells, args))
    print(markdown(cells, args))


if __name__ == "__main__":
    main()
