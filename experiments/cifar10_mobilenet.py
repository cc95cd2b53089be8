"""MobileNetV2 fine-tuned on CIFAR-10, split between a client and a server (the report's section 2).

    python -m experiments.cifar10_mobilenet fit --config experiments/configs/cifar10_small.yaml

The report's partition: the client runs ``features[0]``'s convolution and BatchNorm (head) and the pooling +
classifier (tail); the server runs that block's ReLU6 and ``features[1:]`` (body). The up cut carries
[B, 32, H/2, W/2], the down cut [B, 1280, H/32, W/32].
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassAccuracy
from torchvision import models
from torchvision.datasets import CIFAR10
from torchvision.transforms import v2

from experiments.partition import check as partition_check
from experiments.partition import own_shard
from splitlit import Split

__all__ = ["REPORT_ROWS", "CIFAR10DataModule", "LocalCIFAR10", "MobileNetV2Classifier", "main", "report_codecs"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LocalCIFAR10(CIFAR10):
    """torchvision's CIFAR-10 reader without the md5 check, for re-encoded copies (``../shared/data/cifar10``)."""

    train_list = [[f"data_batch_{i}", None] for i in range(1, 6)]
    test_list = [["test_batch", None]]
    meta = {"filename": "batches.meta", "key": "label_names", "md5": None}

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                   for name, _ in self.train_list + self.test_list)


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 resized for an ImageNet network.

    Args:
        data_dir: folder holding ``cifar-10-batches-py`` (any copy: the md5 check is skipped); when it is
            missing and ``download`` is true, torchvision downloads the release there.
        batch_size: images per batch (the report: 64).
        image_size: side after resizing (the report: 224).
        train_subset / val_subset: use only the first N images (the files interleave the classes, so a
            prefix is balanced); None for all. Validation is the 10,000-image test set.
        num_workers: DataLoader workers.
        download: allow torchvision to download when ``data_dir`` has no copy.
        partition: with many clients (``SplitPipelineStrategy(clients=N)``), how the training set is split among
            them: ``"iid"`` or ``"dirichlet"`` (label skew, see :mod:`experiments.partition`); each client builds
            only its own shard. None: every client trains on all of ``data_dir`` (a client with its own folder).
        alpha: the Dirichlet concentration (``partition="dirichlet"``).
        partition_seed: the partition's seed; the same on every client.
    """

    def __init__(self, data_dir: str = "data/cifar10", batch_size: int = 64, image_size: int = 224,
                 train_subset: int | None = None, val_subset: int | None = None, num_workers: int = 0,
                 download: bool = True, partition: str | None = None, alpha: float = 0.5,
                 partition_seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or image_size < 32:
            raise ValueError(f"CIFAR10DataModule: batch_size={batch_size} must be >= 1 and "
                             f"image_size={image_size} >= 32.")
        if partition is not None:
            partition_check(partition, alpha)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.train_set = self.val_set = None

    def _transform(self, train: bool) -> v2.Compose:
        steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if self.hparams.image_size != 32:
            steps.append(v2.Resize(self.hparams.image_size, antialias=True))
        if train:
            steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
        return v2.Compose(steps)

    def _dataset(self, train: bool) -> CIFAR10:
        local = self.data_dir / "cifar-10-batches-py"
        if local.is_dir():
            return LocalCIFAR10(str(self.data_dir), train=train, transform=self._transform(train))
        if not self.hparams.download:
            raise FileNotFoundError(
                f"No CIFAR-10 at {local}. Point --data.data_dir at a folder holding cifar-10-batches-py "
                f"(e.g. ../shared/data/cifar10), or allow --data.download true."
            )
        return CIFAR10(str(self.data_dir), train=train, download=True, transform=self._transform(train))

    def prepare_data(self) -> None:
        if not (self.data_dir / "cifar-10-batches-py").is_dir() and self.hparams.download:
            CIFAR10(str(self.data_dir), train=True, download=True)

    def setup(self, stage: str) -> None:
        subset = lambda ds, n: Subset(ds, range(min(n, len(ds)))) if n else ds  # noqa: E731
        if stage == "fit":
            self.train_set = subset(self._dataset(train=True), self.hparams.train_subset)
            self.train_set = self._own_shard(self.train_set)
        self.val_set = subset(self._dataset(train=False), self.hparams.val_subset)

    def _own_shard(self, dataset: Any) -> Any:
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        indices = dataset.indices if isinstance(dataset, Subset) else range(len(dataset))
        return own_shard(dataset, self.trainer, label=lambda i: base.targets[indices[i]],
                         scheme=self.hparams.partition, alpha=self.hparams.alpha, seed=self.hparams.partition_seed,
                         batch_size=self.hparams.batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    test_dataloader = val_dataloader


def load_mobilenet_v2(pretrained: str | None, num_classes: int) -> models.MobileNetV2:
    """torchvision's MobileNetV2 with a new ``num_classes`` head.

    ``pretrained``: None (random), ``"imagenet"`` (torchvision's IMAGENET1K_V1, downloaded or from the torch
    hub cache), or the path of a state-dict file such as ``../shared/data/weights/mobilenet_v2-b0353104.pth``.
    """
    net = models.mobilenet_v2(weights=None)
    if pretrained == "imagenet":
        try:
            weights = models.MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as err:  # noqa: BLE001 - offline: say how to use a local copy
            raise RuntimeError(
                f"Could not download torchvision's MobileNetV2 ImageNet weights ({err}). Offline, pass the file: "
                f"--model.pretrained ../shared/data/weights/mobilenet_v2-b0353104.pth"
            ) from err
        net.load_state_dict(weights)
    elif pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"--model.pretrained {pretrained}: no such file. Give a MobileNetV2 state-dict "
                                    f"file, 'imagenet' to download torchvision's weights, or null for random.")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.classifier[1] = nn.Linear(net.last_channel, num_classes)
    return net


class MobileNetV2Classifier(L.LightningModule):
    """MobileNetV2 for CIFAR-10 with the report's U split; trains split or unsplit unchanged.

    Args:
        num_classes: classes of the new head.
        pretrained: see :func:`load_mobilenet_v2`.
        lr / momentum / weight_decay: SGD settings (the report: 0.005, 0.1, 0).
        up_codec / down_codec: codecs at the client -> server and server -> client cuts (splitlit.codecs).
        codec_lr: learning rate of the codecs' own parameters (default: ``lr / 10``). Calibrated codecs start
            close to what they replace and a full learning rate throws that away (one seed, 96 px: conv insert
            0.070 with 10x or 1x the model's rate lost far more accuracy than with lr/10 or frozen; not yet
            measured over seeds: ``python -m experiments.bench_codecs --codec-lr ... --seeds 0-4``).
    """

    def __init__(self, num_classes: int = 10, pretrained: str | None = None, lr: float = 0.005,
                 momentum: float = 0.1, weight_decay: float = 0.0, up_codec: nn.Module | None = None,
                 down_codec: nn.Module | None = None, codec_lr: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["up_codec", "down_codec"])
        self.net = load_mobilenet_v2(pretrained, num_classes)
        self.up_codec = up_codec
        self.down_codec = down_codec
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self._split: Split | None = None

    def configure_split(self) -> Split:
        if self._split is None:
            first = self.net.features[0]  # Conv2dNormActivation: conv, BatchNorm, ReLU6
            self._split = Split(
                head=nn.Sequential(first[0], first[1]),
                body=nn.Sequential(first[2], *self.net.features[1:]),
                tail=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), self.net.classifier),
                up=self.up_codec,
                down=self.down_codec,
            )
        return self._split

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.configure_split()(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    test_step = validation_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        codec_params = [p for c in (self.up_codec, self.down_codec) if c is not None for p in c.parameters()]
        codec_ids = {id(p) for p in codec_params}
        groups = [{"params": [p for p in self.parameters() if id(p) not in codec_ids]}]
        if codec_params:
            groups.append({"params": codec_params, "lr": hp.lr / 10 if hp.codec_lr is None else hp.codec_lr})
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


# The report's rows, one preset each: configs/cifar10_<row>_c1.yaml (and _c4, _c8, which differ in chunks only).
_PRESETS = Path(__file__).parent / "configs"
REPORT_ROWS = tuple(sorted(p.stem[len("cifar10_"):-len("_c1")] for p in _PRESETS.glob("cifar10_*_c1.yaml")))


def report_codecs(row: str, **overrides: Any) -> tuple[nn.Module | None, nn.Module | None]:
    """The (up, down) codecs of one of the report's rows (:data:`REPORT_ROWS`: ``none``, ``convinsert097``,
    ``convinsert070``, ``poweriter3_7``), built as the row's preset builds them; ``overrides`` (e.g.
    ``iters=2``) go to both codecs."""
    if row not in REPORT_ROWS:
        raise ValueError(f"Unknown report codec {row!r}; choose one of {sorted(REPORT_ROWS)}.")
    model = yaml.safe_load((_PRESETS / f"cifar10_{row}_c1.yaml").read_text()).get("model") or {}
    return _codec(model.get("up_codec"), overrides), _codec(model.get("down_codec"), overrides)


def _codec(spec: dict[str, Any] | None, overrides: dict[str, Any]) -> nn.Module | None:
    if spec is None:
        return None
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**{**(spec.get("init_args") or {}), **overrides})


def main(args: list[str] | None = None) -> None:
    from experiments.cli import run_cli

    run_cli(MobileNetV2Classifier, CIFAR10DataModule, default_config="cifar10_mobilenet.yaml", args=args)


if __name__ == "__main__":
    main()
