"""Model codecs (power iteration, conv insert): reconstruction, gradients, sizes, errors, calibration, two ranks."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from callbacks import CodecCalibration
from experiments.cifar10_mobilenet import report_codecs
from splitlit import Split
from splitlit.calibration import calibrate
from splitlit.codecs import ConvInsert, PowerIteration, make_codec
from tests.twoproc import REPO, SHARED_DATA, run_fit_script

UP_224, DOWN_224 = (64, 32, 112, 112), (64, 1280, 7, 7)  # the report's cuts: MobileNetV2 at 224, batch 64


def low_rank(b: int, c: int, n: int, r: int, *, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, r, generator=gen, dtype=torch.float64) @ torch.randn(b, r, n, generator=gen,
                                                                                 dtype=torch.float64)


def encoded_bytes(codec: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return sum(t.numel() * t.element_size() for t in codec.encoder(x))


# -- power iteration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r,rank", [(3, 3), (2, 3), (1, 4)])
def test_poweriter_reconstructs_images_of_rank_at_most_r(r, rank):
    """An activation [B, C, H, W] whose [C, H*W] matrices have rank <= r comes back exactly."""
    x = low_rank(4, 16, 36, r).reshape(4, 16, 6, 6)
    assert torch.allclose(PowerIteration(rank)(x), x, atol=1e-10)


def test_poweriter_reconstructs_sequences_and_passes_extras():
    """A sequence [B, T, D] of rank <= r comes back exactly, as [B, T, r] + [B, r, D]; an int64 mask rides along."""
    x, mask = low_rank(2, 10, 24, 4), torch.ones(2, 10, dtype=torch.int64)
    codec = PowerIteration(4)
    q, p, m = codec.encoder(x, mask)
    assert (q.shape, p.shape) == ((2, 10, 4), (2, 4, 24)) and m is mask
    x_hat, m2 = codec.decoder(q, p, m)
    assert torch.allclose(x_hat, x, atol=1e-10) and m2 is mask


def test_poweriter_more_iterations_approach_the_best_rank_r_error():
    """Subspace iteration: the error falls with iters towards the truncated-SVD error."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 50, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 50, dtype=torch.float64)
    errors = [(PowerIteration(5, iters=i)(x) - x).norm().item() for i in (1, 2, 6)]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    best = (u[..., :5] @ torch.diag_embed(s[..., :5]) @ vh[..., :5, :] - x).norm().item()
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1.02 * best


def test_poweriter_default_iterations_beat_the_reports_one():
    """The default (2 iterations) reconstructs a decaying spectrum better than the report's single iteration."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 64, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 64, dtype=torch.float64)
    assert PowerIteration(3).iters == 2
    assert (PowerIteration(3)(x) - x).norm() < 0.95 * (PowerIteration(3, iters=1)(x) - x).norm()


def test_poweriter_gradcheck_float64():
    """torch.autograd.gradcheck passes through encoder (QR) and decoder, for images and sequences."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    seq = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PowerIteration(2, iters=2), (image,))
    assert torch.autograd.gradcheck(PowerIteration(2), (seq,))
    assert torch.autograd.gradcheck(lambda t: PowerIteration(2).encoder(t), (image,))


def test_poweriter_is_deterministic_given_the_seed():
    """The same seed encodes the same input identically (across instances); another seed gives other factors."""
    x = torch.randn(2, 8, 30, dtype=torch.float64)
    a, b, c = PowerIteration(2, seed=7), PowerIteration(2, seed=7), PowerIteration(2, seed=8)
    assert all(torch.equal(u, v) for u, v in zip(a.encoder(x), b.encoder(x)))
    assert not torch.equal(a.encoder(x)[0], c.encoder(x)[0])


def test_poweriter_3_7_rate_on_mobilenet_224_is_the_reports():
    """Poweriter(3,7) at the report's cuts: the encoders send exactly the analytic bytes, rate 0.101 +- 0.005."""
    up, down = report_codecs("poweriter3_7")
    sent = encoded_bytes(up, torch.randn(UP_224)) + encoded_bytes(down, torch.randn(DOWN_224))
    assert sent == up.payload_bytes(UP_224) + down.payload_bytes(DOWN_224) == 4 * (2_414_592 + 595_392)
    assert abs(sent / (4 * (math.prod(UP_224) + math.prod(DOWN_224))) - 0.101) <= 0.005


# -- conv insert ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row,rate", [("convinsert097", 0.08784), ("convinsert070", 0.06757)])
def test_convinsert_presets_send_their_analytic_bytes(row, rate):
    """The report's conv-insert presets send exactly their analytic size; the geometry gives 0.0878 and 0.0676."""
    up, down = report_codecs(row)
    sent = encoded_bytes(up, torch.randn(UP_224)) + encoded_bytes(down, torch.randn(DOWN_224))
    assert sent == up.payload_bytes(UP_224) + down.payload_bytes(DOWN_224)
    assert abs(sent / (4 * (math.prod(UP_224) + math.prod(DOWN_224))) - rate) < 1e-4


@pytest.mark.parametrize("kernel,code", [(2, 6), (1, 3)])
def test_convinsert_pca_init_reconstructs_patches_of_rank_at_most_code(kernel, code):
    """After PCA initialisation, activations whose k x k patches span <= code dimensions come back exactly."""
    gen = torch.Generator().manual_seed(0)
    c, side, n = 4, 8, 6
    basis = torch.randn(code, c * kernel * kernel, generator=gen, dtype=torch.float64)
    patches = torch.randn(n * (side // kernel) ** 2, code, generator=gen, dtype=torch.float64) @ basis
    patches -= patches.mean(0)  # zero mean, so the per-channel offset below is the mean PCA centres on
    cols = patches.reshape(n, (side // kernel) ** 2, -1).transpose(1, 2)
    offset = torch.arange(c, dtype=torch.float64).view(1, c, 1, 1)
    x = (torch.nn.functional.fold(cols, (side, side), kernel, stride=kernel) + offset).float()
    codec = ConvInsert(c, code, kernel_size=kernel)
    assert codec.reconstruction_error(x) > 0.5
    codec.init_from_activations(x)
    assert codec.reconstruction_error(x) < 1e-5


def test_convinsert_gradcheck_float64():
    """torch.autograd.gradcheck passes through the conv encoder and transposed-conv decoder."""
    codec = ConvInsert(3, 2, kernel_size=2).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(codec, (x,))


# -- registry and errors -------------------------------------------------------------------------------------------
def test_make_codec_by_name():
    """Short names build the codecs; 'none' means no codec."""
    assert isinstance(make_codec("poweriter", rank=3), PowerIteration)
    assert isinstance(make_codec("ConvInsert", in_channels=8, code_channels=2), ConvInsert)
    assert make_codec("none") is None


@pytest.mark.parametrize("call,match", [
    (lambda: make_codec("jpeg"), r"Unknown codec 'jpeg'; choose one of \['convinsert', 'poweriter'\]"),
    (lambda: report_codecs("conv"), r"Unknown report codec 'conv'"),
    (lambda: PowerIteration(0), r"PowerIteration\(rank=0\): rank must be a positive integer"),
    (lambda: PowerIteration(2.5), r"PowerIteration\(rank=2.5\)"),
    (lambda: PowerIteration(3, iters=0), r"PowerIteration\(iters=0\)"),
    (lambda: PowerIteration(8)(torch.randn(2, 4, 3, 3)), r"rank=8\) is impossible .* at most 4"),
    (lambda: PowerIteration(2)(torch.randn(2, 4)), r"needs an activation \[B, C, \.\.\.\]"),
    (lambda: ConvInsert(0, 4), r"ConvInsert\(in_channels=0\)"),
    (lambda: ConvInsert(8, -1), r"ConvInsert\(code_channels=-1\)"),
    (lambda: ConvInsert(8, 4, kernel_size=0), r"ConvInsert\(kernel_size=0\)"),
    (lambda: ConvInsert(8, 4, kernel_size=2, stride=4), r"stride larger than the kernel"),
    (lambda: ConvInsert(8, 4)(torch.randn(2, 6, 4, 4)), r"in_channels=8\) got an activation of shape \[2, 6, 4, 4\]"),
    (lambda: ConvInsert(8, 4, kernel_size=4)(torch.randn(2, 8, 6, 6)), r"cannot invert its geometry"),
    (lambda: CodecCalibration(batches=0), r"CodecCalibration\(batches=0\)"),
    (lambda: CodecCalibration(distill_steps=-1), r"CodecCalibration\(distill_steps=-1\)"),
    (lambda: CodecCalibration(adapt_steps=1.5), r"CodecCalibration\(adapt_steps=1.5\)"),
])
def test_clear_errors(call, match):
    """Bad names, ranks, channels and kernel sizes fail with a message naming the value and the fix."""
    with pytest.raises(ValueError, match=match):
        call()


def test_warns_when_the_code_saves_nothing():
    """A rank r >= C*N/(C+N), or a conv code as large as the patch, warns that it does not compress."""
    with pytest.warns(UserWarning, match=r"saves nothing"):
        PowerIteration(3)(torch.randn(2, 4, 2, 2))
    with pytest.warns(UserWarning, match=r"does not compress"):
        ConvInsert(4, 16, kernel_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PowerIteration(3)(torch.randn(2, 32, 8, 8))


# -- calibration ---------------------------------------------------------------------------------------------------
def test_calibrate_initialises_codecs_and_leaves_the_network_alone():
    """calibrate() cuts each conv codec's error, in eval mode: BatchNorm statistics and train flags unchanged."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
    body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    split = Split(head, body, nn.Flatten(1), up=ConvInsert(8, 4, kernel_size=2), down=ConvInsert(16, 4))
    stats = [t.clone() for t in head[1].buffers()]
    batches = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    report = calibrate(split, batches, warmup_steps=3)
    for cut in ("up", "down"):
        assert report[cut]["error_init"] < 0.9 * report[cut]["error_fresh"]
    assert all(torch.equal(a, b) for a, b in zip(stats, head[1].buffers()))
    assert head.training and split.up.training


def _bn_split(up: nn.Module | None, down: nn.Module | None) -> Split:
    """A small CNN whose head ends in a BatchNorm with running statistics far from the batch's (offset 3)."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
    head[1].running_mean.fill_(3.0)
    body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    return Split(head, body, nn.Flatten(1), up=up, down=down)


@pytest.mark.parametrize("batch_stats", [True, False])
def test_calibrate_sees_batch_statistics_by_default(batch_stats):
    """With batch_stats the PCA centres on the batch-normalised head output (mean ~0), else on the running one."""
    split = _bn_split(ConvInsert(8, 4, kernel_size=2), None)
    batches = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    calibrate(split, batches, batch_stats=batch_stats)
    centre = split.up.decoder.conv.bias  # the per-channel mean the PCA centred on
    if batch_stats:
        assert centre.abs().max() < 1e-4  # BatchNorm's beta is 0: batch-normalised channels have mean 0
    else:
        assert centre.mean() < -1.0  # (x - 3) / sqrt(1 + eps) with x ~ 0: about -3 per channel
    assert split.head[1].running_mean.eq(3.0).all() and split.head[1].num_batches_tracked == 0


def test_distill_trains_only_the_codecs_towards_the_uncompressed_tail_input():
    """Distillation cuts the error of what the tail receives, and leaves the network's weights and grads alone."""
    split = _bn_split(ConvInsert(8, 4, kernel_size=2), ConvInsert(16, 8))
    net = [p for m in (split.head, split.body) for p in m.parameters()]
    before = [p.detach().clone() for p in net]
    batches = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    report = calibrate(split, batches, pca=False, distill_steps=60, distill_lr=1e-2)
    assert report["tail_input"]["error_after"] < 0.7 * report["tail_input"]["error_before"]
    assert all(torch.equal(a, p) and p.grad is None for a, p in zip(before, net))
    assert "tail_input" not in calibrate(split, batches)  # no distillation steps: no extra passes


def test_adapt_trains_the_network_towards_what_the_tail_received_before():
    """adapt_steps: head, body and codecs learn to give the tail what the uncompressed network gave it; the tail,
    frozen parameters and BatchNorm statistics stay, and no .grad is left behind."""
    split = _bn_split(PowerIteration(2), None)  # at the up cut, so the network can make up for it
    split.tail = nn.Sequential(nn.Flatten(1), nn.Linear(16 * 4 * 4, 3))
    split.body[1].bias.requires_grad_(False)
    frozen, tail = split.body[1].bias.detach().clone(), [p.detach().clone() for p in split.tail.parameters()]
    trained = [split.head[0].weight, split.body[1].weight]
    before = [p.detach().clone() for p in trained]
    buffers = [b.clone() for b in split.head[1].buffers()]
    batches = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    report = calibrate(split, batches, adapt_steps=60, adapt_lr=1e-2)
    assert report["adapted"]["error_after"] < 0.7 * report["adapted"]["error_before"]
    assert all(not torch.equal(a, p) for a, p in zip(before, trained))
    assert torch.equal(frozen, split.body[1].bias)
    assert all(torch.equal(a, p) for a, p in zip(tail, split.tail.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, split.head[1].buffers()))
    assert all(p.grad is None for m in (split.head, split.body, split.tail) for p in m.parameters())
    assert "adapted" not in calibrate(_bn_split(None, None), batches, adapt_steps=5)  # nothing to adapt to


def test_warmup_lowers_the_error_of_a_codec_pca_cannot_initialise():
    """A conv insert with overlapping patches gets no PCA form; the reconstruction warm-up still trains it."""
    codec = ConvInsert(4, 4, kernel_size=3, stride=1, padding=1)
    x = torch.randn(32, 4, 6, 6)
    codec.init_from_activations(x)
    before, after = codec.warmup(x, steps=60, lr=1e-2)
    assert after < 0.8 * before


# -- YAML presets --------------------------------------------------------------------------------------------------
PRESETS = sorted((REPO / "experiments" / "configs").glob("cifar10_*_c[0-9]*.yaml"))


def test_there_are_twelve_codec_presets():
    """One preset per report row (none, conv insert 0.097 / 0.070, poweriter (3,7)) and chunk count (1, 4, 8)."""
    names = {p.stem for p in PRESETS}
    assert names == {f"cifar10_{c}_c{k}" for c in ("none", "convinsert097", "convinsert070", "poweriter3_7")
                     for k in (1, 4, 8)}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_instantiate(preset, monkeypatch):
    """Each preset builds its model, codecs, calibration and strategy through LightningCLI (no training)."""
    monkeypatch.setattr("sys.argv", ["cifar10_mobilenet"])  # pytest's own arguments are not the CLI's
    from lightning.pytorch.cli import LightningCLI

    from experiments.cifar10_mobilenet import CIFAR10DataModule, MobileNetV2Classifier
    from experiments.cli import CONFIG_DIR

    cli = LightningCLI(MobileNetV2Classifier, CIFAR10DataModule, run=False, args=["--config", str(preset)],
                       parser_kwargs={"default_config_files": [str(CONFIG_DIR / "cifar10_mobilenet.yaml")]},
                       save_config_callback=None)
    codec, chunks = preset.stem[len("cifar10_"):].rsplit("_c", 1)
    assert cli.trainer.strategy.chunks == int(chunks)
    up, down = report_codecs(codec)
    for built, expected in ((cli.model.up_codec, up), (cli.model.down_codec, down)):
        assert type(built) is type(expected) and repr(built) == repr(expected)
    calibrations = [cb for cb in cli.trainer.callbacks if isinstance(cb, CodecCalibration)]
    assert len(calibrations) == (0 if codec == "none" else 1)
    assert all(cb.adapt_steps == 50 for cb in calibrations)


# -- two ranks -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rank_results() -> dict[tuple[str, int], dict]:
    result = run_fit_script(REPO / "tests" / "scripts" / "fit_codecs.py", ["--data", str(SHARED_DATA / "cifar10")],
                            timeout=300)
    assert result.returncode == 0, result.output[-4000:]
    # raw_decode: the other rank's output may follow a result on its line (they share the pipe)
    lines = [json.JSONDecoder().raw_decode(line[len("RESULT "):])[0] for line in result.output.splitlines()
             if line.startswith("RESULT ")]
    return {(r["name"], r["rank"]): r for r in lines}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["none", "poweriter", "convinsert", "wire", "poweriter+wire"])
def test_two_rank_training_step_sends_the_analytic_bytes(two_rank_results, name):
    """Split training with each codec runs on two ranks, both ranks meter exactly the analytic bytes, and only the
    client holds a loss: the server has no metric at all."""
    for rank in (0, 1):
        r = two_rank_results[(name, rank)]
        assert r["bytes"] == r["expected"], r
        assert set(r["bytes"]) == {"up.activation", "up.gradient", "down.activation", "down.gradient"}
    client, server = two_rank_results[(name, 0)], two_rank_results[(name, 1)]
    assert math.isfinite(client["loss"]) and math.isfinite(client["val_loss"])
    assert server["metric_names"] == []
    if name != "none":
        assert sum(two_rank_results[(name, 0)]["bytes"].values()) < sum(two_rank_results[("none", 0)]["bytes"].values())


@pytest.mark.slow
def test_calibration_on_the_client_reaches_the_server(two_rank_results):
    """CodecCalibration runs on the client; the server's codec halves and body are the calibrated and adapted
    ones (lr 0 here)."""
    client, server = two_rank_results[("convinsert", 0)], two_rank_results[("convinsert", 1)]
    assert client["calibration"]["up"]["error_init"] < client["calibration"]["up"]["error_fresh"]
    assert client["calibration"]["adapted"]["error_after"] < client["calibration"]["adapted"]["error_before"]
    assert client["calibrated"]["body"] != pytest.approx(client["body_before"], rel=1e-9)
    for part in ("up.decoder", "down.encoder", "body"):
        assert server["server_has"][part] == pytest.approx(client["calibrated"][part], rel=1e-9)
