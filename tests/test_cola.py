"""CoLA / RoBERTa experiment: the split is transparent, the data is read strictly, the presets instantiate.

A tiny RoBERTa (random weights, 3 layers, hidden 32) with the real roberta-base tokenizer and the real CoLA TSVs
from ../shared/data stands in for roberta-base, whose weights cannot be had offline.
"""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from experiments.cli import CONFIG_DIR
from experiments.cola_data import CoLADataModule, CoLAFormatError, read_glue_cola_tsv
from experiments.cola_roberta import CoLAClassifier, MatthewsCorrCoef, main
from splitlit import SplitPipelineStrategy
from splitlit.calibration import calibrate
from splitlit.codecs import PowerIteration
from tests.twoproc import REPO, SHARED_DATA, run_fit_script

TOKENIZER = str(SHARED_DATA / "roberta-base-tokenizer")
COLA = SHARED_DATA / "cola"
TINY = {"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
PRESETS = sorted(CONFIG_DIR.glob("cola_*.yaml"))


def tiny_model(**kwargs) -> CoLAClassifier:
    torch.manual_seed(0)
    return CoLAClassifier(TOKENIZER, pretrained=False, config_overrides=TINY, **kwargs)


@pytest.fixture(scope="module")
def dev_batch() -> dict[str, torch.Tensor]:
    dm = CoLADataModule(TOKENIZER, str(COLA), batch_size=12)
    dm.setup("validate")
    return dm.collate(dm.dev_set[500:512])  # in-domain and out-of-domain rows, several lengths


def _pipeline_by_hand(split, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three stages as the pipeline runs them: each cut a detached leaf, gradients handed back by hand."""
    head, body, tail = split.stages()
    hidden, mask = head(batch["input_ids"], batch["attention_mask"])
    up = hidden.detach().requires_grad_()
    first = body(up, mask)
    down = first.detach().requires_grad_()
    logits = tail(down)
    loss = F.cross_entropy(logits, batch["labels"])
    loss.backward()
    first.backward(down.grad)
    hidden.backward(up.grad)
    return logits.detach(), mask, down


def test_split_gradients_equal_unsplit(dev_batch):
    """Head, body and tail run stage by stage give the HF model's logits and every parameter's gradient."""
    model = tiny_model()
    reference = copy.deepcopy(model.model)
    ref_logits = reference(input_ids=dev_batch["input_ids"], attention_mask=dev_batch["attention_mask"]).logits
    F.cross_entropy(ref_logits, dev_batch["labels"]).backward()
    logits, mask, down = _pipeline_by_hand(model.configure_split(), dev_batch)
    assert mask.dtype == torch.int64 and bool((mask == 0).any())  # padding present: the mask really matters
    assert down.shape == (12, TINY["hidden_size"])  # the down cut carries only the first token's hidden state
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-5, atol=1e-6)
    ref = dict(reference.named_parameters())
    for name, p in model.model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_bert_family_splits_too(tmp_path, dev_batch):
    """A BERT model (pooler + classifier tail, as all-MiniLM-L6-v2) gives the same logits split and unsplit."""
    from transformers import BertConfig

    BertConfig(vocab_size=50265, **TINY).save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = CoLAClassifier(str(tmp_path), pretrained=False).eval()
    split_logits = model(dev_batch["input_ids"], dev_batch["attention_mask"])
    ref = model.model(input_ids=dev_batch["input_ids"], attention_mask=dev_batch["attention_mask"]).logits
    assert model.configure_split().tail.pooler is not None
    torch.testing.assert_close(split_logits, ref)


def test_the_server_copy_of_a_pretrained_encoder_switches_modes_with_the_clients_part_on_meta(tmp_path):
    """The server's model holds the client's head and tail on the meta device; Lightning calls .train()/.eval() on
    it around every validation. Loaded with from_pretrained (as the main job's all-MiniLM-L6-v2 is; here a tiny BERT
    saved to a folder), that must not swap in hub kernels (transformers >= 5.25 does by default and again on every
    mode switch), which cannot run on meta tensors."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**TINY, vocab_size=64, num_labels=2)).save_pretrained(tmp_path)
    model = CoLAClassifier(str(tmp_path))
    assert not model.encoder.use_kernels
    split = model.configure_split()
    for part in (split.head, split.tail):
        part.to("meta")
    model.eval()
    model.train()
    assert model.training and next(split.head.parameters()).is_meta


def test_lora_trainable_parameters_per_rank():
    """With LoRA the client trains layer 0's query/value adapters and the head, the server the other adapters."""
    model = tiny_model(lora_r=4)
    split = model.configure_split()
    names = {id(p): n for n, p in model.named_parameters()}

    def trainable(modules):
        return {names[id(p)].split("encoder.layer.")[-1].split("model.classifier.")[-1]
                for m in modules for p in m.parameters() if p.requires_grad}

    lora = {f"{layer}.attention.self.{proj}.lora_{ab}.default.weight"
            for layer in range(3) for proj in ("query", "value") for ab in "AB"}
    client, server = trainable(split.client_modules()), trainable(split.server_modules())
    assert client == {n for n in lora if n.startswith("0.")} | {"dense.weight", "dense.bias", "out_proj.weight",
                                                                "out_proj.bias"}
    assert server == {n for n in lora if not n.startswith("0.")}
    assert len(client) + len(server) == sum(p.requires_grad for p in model.parameters())  # nothing else trains


def test_adaptation_to_a_codec_trains_only_what_fine_tuning_would(dev_batch):
    """CodecCalibration's adaptation on a LoRA RoBERTa with power iteration at the up cut: the classifier input
    moves towards the uncompressed one, only LoRA adapters change, and the attention mask rides through."""
    model = tiny_model(lora_r=4, up_codec=PowerIteration(4))
    split = model.configure_split()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    report = calibrate(split, [model.split_inputs(dev_batch)], adapt_steps=30, adapt_lr=1e-2)
    assert report["adapted"]["error_after"] < 0.8 * report["adapted"]["error_before"]
    params = dict(model.named_parameters())
    assert all(torch.equal(v, params[n]) for n, v in frozen.items())
    assert any(not torch.equal(v, params[n]) for n, v in lora.items())


def test_dev_set_scored_whole():
    """One validation scores all 1,043 dev sentences (short last batch included) and logs MCC, accuracy, loss."""

    class Count(Callback):
        rows = 0

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.rows += int(batch["labels"].shape[0])

    count = Count()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[count])
    (metrics,) = trainer.validate(tiny_model(), CoLADataModule(TOKENIZER, str(COLA), eval_batch_size=100))
    assert count.rows == 1043
    assert set(metrics) == {"val/mcc", "val/acc", "val/loss"}
    assert 0.0 <= metrics["val/acc"] <= 1.0 and math.isfinite(metrics["val/loss"])


def test_low_rank_codec_pads_to_max_length_and_reaches_the_reports_rate(dev_batch):
    """padding='max_length' gives every batch max_length tokens, where rank 16 on roberta-base's 768 dimensions is the
    report's rate of 0.146; padded to the longest sentence (16 here) rank 16 sends more than the raw tensor."""
    dm = CoLADataModule(TOKENIZER, str(COLA), max_length=128, padding="max_length")
    dm.setup("validate")
    batch = dm.collate(dm.dev_set[500:512])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (12, 128)
    assert torch.equal(batch["attention_mask"][:, :16], dev_batch["attention_mask"][:, :16])
    assert dev_batch["input_ids"].shape[1] == 16
    codec = PowerIteration(rank=16)
    assert codec.rate((1, 128, 768)) == pytest.approx(0.146, abs=5e-4)
    with pytest.warns(UserWarning, match="saves nothing"):
        assert codec.rate((1, 16, 768)) > 1.0
    model = tiny_model(up_codec=codec)  # hidden 32: 16 * (128 + 32) / (128 * 32)
    assert model.up_rate(128) == pytest.approx(0.625) and tiny_model().up_rate(128) is None
    with pytest.raises(ValueError, match="padding='longest8'"):
        CoLADataModule(TOKENIZER, str(COLA), padding="longest8")


def test_mcc_is_zero_when_one_class_is_predicted():
    """MCC is 0 (not torchmetrics' ~0.025) when every prediction is one class, and the usual value otherwise."""
    labels = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1])
    mcc = MatthewsCorrCoef()
    mcc.update(torch.ones_like(labels), labels)
    assert mcc.compute().item() == 0.0
    preds = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1])
    tp, tn, fp, fn = 4, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = MatthewsCorrCoef()
    mcc.update(preds, labels)
    assert mcc.compute().item() == pytest.approx(expected, abs=1e-6)


def test_real_tsvs_read_whole():
    """The shared GLUE TSVs read as 8,551 training and 1,043 dev rows with labels 0/1."""
    train, dev = read_glue_cola_tsv(COLA / "train.tsv"), read_glue_cola_tsv(COLA / "dev.tsv")
    assert (len(train[0]), len(dev[0])) == (8551, 1043)
    assert sum(dev[1]) == 719 and dev[0][0] == "The sailors rode the breeze clear of the rocks."


@pytest.mark.parametrize("row, message", [
    ("gj04\t1\tThe sailors rode the breeze.", r"line 2: expected 4 tab-separated columns .* found 3"),
    ("gj04\tyes\t\tThe sailors rode the breeze.", r"line 2: the label .* must be 0 or 1, found 'yes'"),
    ("gj04\t0\t*\t  ", r"line 2: the sentence .* is empty"),
])
def test_malformed_tsv_names_file_and_line(tmp_path, row, message):
    """A malformed row raises CoLAFormatError naming the file and the line."""
    path = tmp_path / "train.tsv"
    path.write_text("gj04\t1\t\tOur friends won't buy this analysis.\n" + row + "\n", encoding="utf-8")
    with pytest.raises(CoLAFormatError, match=rf"{path.name}, {message}"):
        read_glue_cola_tsv(path)


def test_missing_tsv_says_where_to_point():
    """A data_dir without the TSVs fails with the folder and the offline copy to use."""
    dm = CoLADataModule(TOKENIZER, str(SHARED_DATA), batch_size=8)
    with pytest.raises(FileNotFoundError, match=r"no train.tsv or dev.tsv there.*\.\./shared/data/cola"):
        dm.setup("fit")


def test_default_preset_offline_fails_fast_with_the_fix(monkeypatch):
    """With no arguments the default preset runs fit; offline it stops at once saying how to use local weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    with pytest.raises(OSError, match=r"roberta-base.*cannot be reached.*--model.model_name_or_path <folder>"):
        main([])


# What each preset must say (from the report and the issue); "split" = on two ranks through the strategy.
EXPECTED = {
    "cola_roberta": {"split": True, "max_epochs": 20, "lr": 2e-5, "weight_decay": 1e-4, "batch_size": 32},
    "cola_lora": {"split": True, "max_epochs": 80, "lr": 4e-4, "lora_r": 8, "lora_alpha": 16, "weight_decay": 0.1,
                  "warmup_ratio": 0.06, "max_length": 512, "batch_size": 32},
    "cola_fairseq": {"split": True, "max_epochs": 10, "lr": 1e-5, "weight_decay": 0.1, "betas": (0.9, 0.98),
                     "eps": 1e-6, "warmup_ratio": 0.06, "batch_size": 16},
    "cola_gpipe": {"split": False, "max_epochs": 20, "lr": 2e-5, "weight_decay": 1e-4, "batch_size": 32},
    "cola_gpipe_40": {"split": False, "max_epochs": 40, "lr": 2e-5, "weight_decay": 1e-4, "batch_size": 32},
    "cola_pipeline_poweriter16": {"split": True, "max_epochs": 20, "lr": 2e-5, "up_rank": 16, "max_length": 128,
                                  "padding": "max_length"},
    "cola_small": {"split": True, "max_length": 64, "order": "zb",
                   "model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
    "cola_clients": {"split": True, "partition": "iid"},  # with cola_small in the README; alone it still builds
}


def test_every_preset_is_checked():
    """Every cola_*.yaml in experiments/configs has its expectations below (a new preset cannot slip by)."""
    assert sorted(p.stem for p in PRESETS) == sorted(EXPECTED)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_instantiates(preset, monkeypatch):
    """The preset parses and builds model, data and Trainer through the CLI (tiny weights swapped in), as stated."""
    from experiments.cli import SplitCLI

    monkeypatch.chdir(REPO)
    args = ["--config", str(preset), "--trainer.logger", "false",
            "--model.model_name_or_path", TOKENIZER, "--model.pretrained", "false",
            "--model.config_overrides", json.dumps(TINY)]
    cli = SplitCLI(CoLAClassifier, CoLADataModule, run=False, args=args, save_config_callback=None,
                   parser_kwargs={"default_config_files": [str(CONFIG_DIR / "cola_roberta.yaml")]})
    want = dict(EXPECTED[preset.stem])
    model_cfg, data_cfg = cli.config["model"], cli.config["data"]
    assert isinstance(cli.trainer.strategy, SplitPipelineStrategy) == want.pop("split")
    assert cli.trainer.max_epochs == want.pop("max_epochs", cli.trainer.max_epochs)
    if isinstance(cli.trainer.strategy, SplitPipelineStrategy):
        assert cli.trainer.strategy.order == want.pop("order", "1f1b")  # cola_roberta.yaml's, unless the preset's
    if "up_rank" in want:
        assert type(cli.model.up_codec).__name__ == "PowerIteration" and cli.model.up_codec.rank == want.pop("up_rank")
    if "model_name_or_path" in want:  # the preset's own model (the test swapped in a tiny one on the command line)
        assert preset.read_text().count(want.pop("model_name_or_path")) == 2  # model and tokenizer
    for key, value in want.items():
        got = model_cfg[key] if key in model_cfg else data_cfg[key]
        assert (tuple(got) if isinstance(value, tuple) else got) == pytest.approx(value), key


@pytest.mark.slow
def test_two_rank_steps_match_one_process(tmp_path):
    """Three split SGD steps (chunks 4, two ranks) leave the same weights as unsplit; all 1,043 dev rows scored."""
    split_dir, plain_dir = tmp_path / "split", tmp_path / "plain"
    script = REPO / "tests" / "scripts" / "cola_fit_tiny.py"
    result = run_fit_script(script, ["--out", str(split_dir), "--chunks", "4"], timeout=240)
    assert result.returncode == 0, result.output[-4000:]
    result = run_fit_script(script, ["--out", str(plain_dir), "--chunks", "0"], timeout=240)
    assert result.returncode == 0, result.output[-4000:]
    split_run = json.loads((split_dir / "result.json").read_text())
    plain_run = json.loads((plain_dir / "result.json").read_text())
    assert split_run["dev_rows"] == plain_run["dev_rows"] == 1043
    client, server = split_run["optimizer_params"]
    assert client > 0 and server > 0 and client + server == plain_run["optimizer_params"][0]
    split_w = torch.load(split_dir / "weights.pt", weights_only=True)
    plain_w = torch.load(plain_dir / "weights.pt", weights_only=True)
    assert split_run["batches"] == plain_run["batches"] and len(plain_run["batches"]) == 3  # the same data
    assert split_w.keys() == plain_w.keys()
    for key in plain_w:
        # SGD (lr 0.5) on gradients summed over micro-batches instead of the whole batch: float rounding only.
        torch.testing.assert_close(split_w[key], plain_w[key], rtol=1e-5, atol=1e-6, msg=key)
    assert split_run["metrics"]["val/loss"] == pytest.approx(plain_run["metrics"]["val/loss"], abs=1e-6)
