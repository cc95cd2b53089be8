"""The leakage attacks find what is known to be there, the defences lower it, and the monitor adds no traffic."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import Defences, LeakageMonitor
from experiments.leakage_public import PublicCIFAR10
from splitlit import Split
from splitlit.leakage import (activation_noise, distance_correlation, gradient_noise, label_auc_cosine,
                              label_auc_norm, nopeek, reconstruction_scores, token_recovery, train_decoder)
from tests.twoproc import REPO, run_fit_script

LEAKAGE_FIT = REPO / "tests" / "scripts" / "leakage_fit.py"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the attacks on synthetic data ---------------------------------------------------------------------------------
def test_gradient_norms_that_separate_the_classes_give_an_auc_near_1_and_random_ones_near_half():
    """Norm attack: class 1's gradients three times larger -> AUC 1; norms independent of the label -> ~0.5."""
    labels = torch.randint(0, 2, (2000,), generator=_gen())
    grads = torch.randn(2000, 32, generator=_gen(1)) * (1 + 2 * labels[:, None])
    assert label_auc_norm(grads, labels) > 0.99
    assert abs(label_auc_norm(torch.randn(2000, 32, generator=_gen(2)), labels) - 0.5) < 0.05


def test_gradient_directions_that_follow_the_class_give_a_cosine_auc_near_1_over_ten_classes():
    """Cosine attack, one class against the rest averaged over 10 classes: class-aligned directions -> ~1,
    random ones -> ~0.5."""
    labels = torch.randint(0, 10, (1000,), generator=_gen())
    centres = torch.randn(10, 64, generator=_gen(1)) * 3
    grads = centres[labels] + torch.randn(1000, 64, generator=_gen(2))
    assert label_auc_cosine(grads, labels) > 0.99
    assert abs(label_auc_cosine(torch.randn(1000, 64, generator=_gen(3)), labels) - 0.5) < 0.06


def test_distance_correlation_is_1_for_identical_and_near_0_for_independent_samples():
    """dCor(x, x) = 1 (also for an isometry of x), and ~0 for independent x and z (bias-corrected)."""
    x = torch.randn(256, 20, generator=_gen())
    assert distance_correlation(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert distance_correlation(x, -2 * x).item() == pytest.approx(1.0, abs=1e-5)
    assert distance_correlation(x, torch.randn(256, 20, generator=_gen(1))).item() < 0.15


def test_a_decoder_on_an_identity_head_reconstructs_with_a_high_psnr():
    """The reconstruction attack trained on public images through an identity head inverts it: PSNR > 25 dB."""
    smooth = lambda n, seed: F.interpolate(torch.rand(n, 3, 4, 4, generator=_gen(seed)), size=16,  # noqa: E731
                                           mode="bilinear", align_corners=False)
    decoder = train_decoder(nn.Identity(), smooth(256, 0), steps=400, batch_size=16, lr=3e-3, width=16)
    private = smooth(32, 1)
    with torch.no_grad():
        psnr, ssim = reconstruction_scores(decoder(private), private)
    assert psnr > 25 and ssim > 0.8, (psnr, ssim)


def test_token_recovery_names_the_nearest_embedding_and_ignores_padding():
    """Hidden states near the embeddings of their tokens are all recovered; padded positions do not count."""
    table = F.normalize(torch.randn(100, 16, generator=_gen()), dim=1)
    ids = torch.randint(0, 100, (4, 6), generator=_gen(1))
    mask = torch.ones_like(ids)
    mask[:, 4:] = 0
    hidden = table[ids] + 0.01 * torch.randn(4, 6, 16, generator=_gen(2))
    hidden[:, 4:] = table[0]  # padding: whatever it holds, it is not scored
    assert token_recovery(hidden, ids, mask, table) == 1.0


# -- the defences --------------------------------------------------------------------------------------------------
def _toy_split(seed: int = 0) -> tuple[Split, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    split = Split(head=nn.Linear(8, 8), body=nn.Sequential(nn.ReLU(), nn.Linear(8, 8)), tail=nn.Linear(8, 2))
    x = torch.randn(64, 8, generator=_gen(seed))
    return split, x, (x[:, 0] > 0).long()


def _train(split: Split, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> None:
    params = [p for m in (split.head, split.body, split.tail) for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(split(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_nopeek_lowers_the_distance_correlation_against_no_defence_on_the_same_seed():
    """The same model, data and seed trained with NoPeek (alpha 2) ends with a lower dCor(inputs, activations)."""
    dcors = []
    for alpha in (0.0, 2.0):
        split, x, y = _toy_split()
        hooks = nopeek(split, alpha) if alpha else []
        _train(split, x, y)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            dcors.append(distance_correlation(x, split.head(x)).item())
    assert dcors[1] < dcors[0] - 0.1, dcors


def _down_gradients(split: Split, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = split.tail.register_forward_pre_hook(lambda m, args: args[0].register_hook(seen.append) and None)
    F.cross_entropy(split(x), y).backward()
    hook.remove()
    return seen[0]


def test_gradient_noise_lowers_the_label_auc():
    """The down-cut gradients give the labels away (cosine AUC ~1); with noise of 10x their scale, far less."""
    split, x, y = _toy_split()
    clean = label_auc_cosine(_down_gradients(split, x, y), y)
    hooks = gradient_noise(split, 10 * _down_gradients(split, x, y).abs().mean().item())
    torch.manual_seed(1)
    noisy = label_auc_cosine(_down_gradients(split, x, y), y)
    for h in hooks:
        h.remove()
    assert clean > 0.95 and noisy < clean - 0.2, (clean, noisy)


def test_activation_noise_changes_what_is_sent_and_not_the_gradient_path():
    """Noise on the up-cut activations: the body receives them noisy, and the head still gets its gradient."""
    split, x, _ = _toy_split()
    clean = split.head(x).detach()
    hooks = activation_noise(split, 1.0)
    noisy = split.head(x)
    noisy.sum().backward()
    for h in hooks:
        h.remove()
    assert (noisy - clean).std() > 0.5 and split.head.weight.grad is not None


# -- bad input -----------------------------------------------------------------------------------------------------
def test_bad_settings_are_refused_with_the_value_and_the_fix():
    """Unknown attacks, alpha < 0, a negative noise scale and recon without public images name what to change."""
    with pytest.raises(ValueError, match=r"attacks=\['label_auc', 'psnr'\].*unknown attack\(s\) \['psnr'\].*choose"):
        LeakageMonitor(attacks=["label_auc", "psnr"])
    with pytest.raises(ValueError, match=r"Defences\(nopeek=-0.1\): give a weight alpha >= 0"):
        Defences(nopeek=-0.1)
    with pytest.raises(ValueError, match=r"Defences\(activation_noise=-1\): give a standard deviation >= 0"):
        Defences(activation_noise=-1)
    with pytest.raises(ValueError, match=r"Defences\(gradient_noise=nan\)"):
        Defences(gradient_noise=math.nan)
    with pytest.raises(ValueError, match=r"needs public_images"):
        LeakageMonitor(attacks=["recon"])


def test_a_public_split_that_overlaps_the_clients_data_is_refused():
    """Public images [1000, 2024) against a client training on the first 2,048: refused, with the bound to use."""
    trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"train_subset": 2048}))
    with pytest.raises(ValueError, match=r"first=1000.*overlap.*first 2,048.*first >= 2048"):
        PublicCIFAR10(first=1000, count=1024).check_disjoint(trainer)
    PublicCIFAR10(first=2048, count=1024).check_disjoint(trainer)  # disjoint: accepted
    everything = SimpleNamespace(datamodule=SimpleNamespace(hparams={"train_subset": None}))
    with pytest.raises(ValueError, match=r"first 50,000"):
        PublicCIFAR10(first=45000).check_disjoint(everything)


# -- the monitor ---------------------------------------------------------------------------------------------------
class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head, self.body, self.tail = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 2))
        self._split = Split(self.head, self.body, self.tail)

    def configure_split(self) -> Split:
        return self._split

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self._split(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_monitor_scores_every_attack_unsplit_with_defences_on(tmp_path):
    """Simulation mode (one process, no strategy): finite label AUCs, dCor and PSNR/SSIM every 2 steps, and the
    grid PNG in the run folder; the defences' hooks run under it."""
    x = torch.rand(64, 3, 8, 8, generator=_gen())
    data = DataLoader(TensorDataset(x, (x.mean((1, 2, 3)) > 0.5).long()), batch_size=16)
    monitor = LeakageMonitor(every_n_steps=2, max_samples=12, attacks=("label_auc", "dcor", "recon"),
                             public_images=SimpleNamespace(images=lambda: torch.rand(64, 3, 8, 8),
                                                           check_disjoint=lambda trainer: None),
                             public_head=nn.Conv2d(3, 4, 3, padding=1), recon_steps=5, image_mean=None,
                             image_std=None)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[Defences(nopeek=0.1, activation_noise=0.01, gradient_noise=1e-4), monitor])
    trainer.fit(_Tiny(), data)
    assert [h["step"] for h in monitor.history] == [1.0, 3.0]
    keys = {"leak/label_auc_norm", "leak/label_auc_cosine", "leak/dcor", "leak/recon_psnr", "leak/recon_ssim",
            "leak/label_auc_norm_logits", "leak/label_auc_cosine_logits"}
    for record in monitor.history:
        assert keys <= set(record) and all(math.isfinite(record[k]) for k in keys), record
    assert (tmp_path / "leak_recon.png").is_file()


@pytest.mark.slow
# zb: the order that splits the backward (input and weight gradients apart); the capture is keyed by micro-batch,
# so the fill-drain and 1f1b orders only reorder the same calls (gpipe and 1f1b were checked when it was built)
@pytest.mark.parametrize("order", ["zb"])
def test_on_two_ranks_the_monitor_logs_on_the_client_only_and_the_link_carries_the_same_bytes(tmp_path, order):
    """Split fits with and without the monitor and all three defences (int8 on the up cut's wire): the client logs
    finite label AUCs, dCor and PSNR and writes its grid, the server nothing, and both ranks' meters and ledgers
    booked identical bytes (neither the monitor nor a defence sends anything)."""
    for flag in ([], ["--monitor"]):
        result = run_fit_script(LEAKAGE_FIT, ["--out", str(tmp_path), "--order", order, *flag], timeout=240)
        assert result.returncode == 0, result.output[-3000:]
    read = lambda tag, rank: json.loads((tmp_path / f"{tag}.rank{rank}.json").read_text())  # noqa: E731
    history = read("monitor", 0)["history"]
    assert len(history) >= 2 and read("monitor", 1)["history"] == []
    for record in history:
        for key in ("leak/label_auc_norm", "leak/label_auc_cosine", "leak/dcor", "leak/recon_psnr",
                    "leak/label_auc_norm_logits"):
            assert math.isfinite(record[key]), record
    assert (tmp_path / "leak_recon.png").is_file()
    for rank in (0, 1):
        plain, monitored = read("plain", rank), read("monitor", rank)
        assert plain["sent"] == monitored["sent"] and plain["received"] == monitored["received"]
        assert plain["ledger"] == monitored["ledger"]
        assert plain["sent"]["total"] > 0


# -- presets -------------------------------------------------------------------------------------------------------
def test_the_leakage_presets_compose_with_the_small_presets(monkeypatch):
    """cifar10_small + leakage_cifar10 + defences_cifar10 and cola_small + leakage_cola build their Trainer with the
    monitor (its attacks, its public images) and the defences, through the CLI, without training."""
    from experiments.cifar10_mobilenet import CIFAR10DataModule, MobileNetV2Classifier
    from experiments.cli import CONFIG_DIR, SplitCLI
    from experiments.cola_data import CoLADataModule
    from experiments.cola_roberta import CoLAClassifier
    from tests.test_cola import TINY, TOKENIZER

    monkeypatch.chdir(REPO)
    configs = lambda *names: [a for n in names for a in ("--config", str(CONFIG_DIR / n))]  # noqa: E731
    cli = SplitCLI(MobileNetV2Classifier, CIFAR10DataModule, run=False, save_config_callback=None,
                   args=[*configs("cifar10_small.yaml", "leakage_cifar10.yaml", "defences_cifar10.yaml"),
                         "--trainer.logger", "false", "--model.pretrained", "null"],
                   parser_kwargs={"default_config_files": [str(CONFIG_DIR / "cifar10_mobilenet.yaml")]})
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, LeakageMonitor))
    defences = next(c for c in cli.trainer.callbacks if isinstance(c, Defences))
    assert monitor.attacks == ("label_auc", "dcor", "recon") and isinstance(monitor.public_images, PublicCIFAR10)
    assert monitor.public_images.first + monitor.public_images.count == 50_000
    assert (defences.nopeek, defences.activation_noise, defences.gradient_noise) == (0.1, 0.1, 1e-4)
    cli = SplitCLI(CoLAClassifier, CoLADataModule, run=False, save_config_callback=None,
                   args=[*configs("cola_small.yaml", "leakage_cola.yaml"), "--trainer.logger", "false",
                         "--model.model_name_or_path", TOKENIZER, "--model.pretrained", "false",
                         "--model.config_overrides", json.dumps(TINY)],
                   parser_kwargs={"default_config_files": [str(CONFIG_DIR / "cola_roberta.yaml")]})
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, LeakageMonitor))
    assert monitor.attacks == ("label_auc", "dcor", "tokens")
