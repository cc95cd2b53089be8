"""The server's public data for the leakage attacks: images held apart from the client's.

    LeakageMonitor(attacks=["recon"], public_images=PublicCIFAR10("../shared/data/cifar10", first=45000))

The honest-but-curious server of the threat model owns public data from the same distribution, disjoint from the
client's. In simulation that is a held-apart slice of CIFAR-10's training files, which the client must not train on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch import Tensor

__all__ = ["CIFAR10_TRAIN", "PublicCIFAR10"]

CIFAR10_TRAIN = 50_000


class PublicCIFAR10:
    """``count`` CIFAR-10 training images from index ``first`` on, resized and normalised as the client's.

    Args:
        data_dir: folder holding ``cifar-10-batches-py``.
        first / count: the held-apart slice [first, first + count) of the 50,000 training images.
        image_size: side after resizing; ``None`` (default): the client's ``--data.image_size``, read at set-up.
    """

    def __init__(self, data_dir: str = "../shared/data/cifar10", first: int = 45_000, count: int = 1024,
                 image_size: int | None = None) -> None:
        if not 0 <= first or count < 1 or first + count > CIFAR10_TRAIN:
            raise ValueError(f"PublicCIFAR10(first={first}, count={count}): the slice must lie within the "
                             f"{CIFAR10_TRAIN:,} training images, e.g. first=45000, count=1024.")
        self.data_dir, self.first, self.count, self.image_size = data_dir, first, count, image_size

    def images(self) -> Tensor:
        from experiments.cifar10_mobilenet import CIFAR10DataModule

        dm = CIFAR10DataModule(self.data_dir, image_size=self.image_size or 96, download=False)
        data = dm._dataset(train=False)  # the evaluation transform: no random flip
        data = type(data)(str(Path(self.data_dir)), train=True, transform=data.transform)
        return torch.stack([data[i][0] for i in range(self.first, self.first + self.count)])

    def check_disjoint(self, trainer: Trainer) -> None:
        """Refuse a slice that overlaps the client's training images (the first ``train_subset`` of them), and
        take the client's image size when none was given."""
        datamodule = getattr(trainer, "datamodule", None)
        hparams = getattr(datamodule, "hparams", {})
        if self.image_size is None and "image_size" in hparams:
            self.image_size = hparams["image_size"]
        train = hparams.get("train_subset") or CIFAR10_TRAIN if "train_subset" in hparams else None
        if train is None:
            return  # not the CIFAR-10 data module: the user vouches for the split
        if self.first < train:
            raise ValueError(
                f"PublicCIFAR10(first={self.first}): the server's public images overlap the client's training "
                f"images (the first {train:,}, --data.train_subset {hparams.get('train_subset')}). Hold them apart: "
                f"first >= {train} (e.g. first={CIFAR10_TRAIN - self.count}), or a smaller --data.train_subset."
            )
