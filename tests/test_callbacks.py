"""The measurement callbacks on synthetic link records: known tensors, a fake clock, exact bytes and times.

No process group: a fake strategy stands in for the two ranks. The server's callback runs first on the
server's records; what it hands to ``gather_to_client`` is what the client's fake returns as rank 1.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import callbacks.pipeline_timing_monitor as timing_module
import splitlit.meter as meter_module
from callbacks import BestMetric, LinkTrafficMonitor, PipelineTimingMonitor
from splitlit.meter import Compute, LinkMeter
from splitlit.traffic import summarize

MB = 1e6


class FakeClock:
    """``time.perf_counter`` that returns the next value of a list."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def perf_counter(self) -> float:
        return self.values.pop(0)


class FakeStrategy:
    """One rank of the split: a meter, a role, and a ``gather_to_client`` whose server row comes from ``peer``."""

    def __init__(self, *, is_client: bool, meter: LinkMeter | None) -> None:
        self.is_client = is_client
        self.meter = meter
        self.root_device = torch.device("cpu")
        self.sent: list[torch.Tensor] = []  # what this rank handed to gather_to_client
        self.peer: list[torch.Tensor] = []  # what the other rank hands, in order

    def gather_to_client(self, tensor: torch.Tensor) -> torch.Tensor | None:
        self.sent.append(tensor.clone())
        if not self.is_client:
            return None  # the server receives nothing
        other = self.peer.pop(0) if self.peer else torch.full_like(tensor, float("nan"))
        return torch.stack([tensor, other])


class FakeTrainer:
    """The attributes of ``Trainer`` the callbacks read, and a record of what they log."""

    def __init__(self, strategy: object, *, loggers: list | None = None, log_every: int = 1) -> None:
        self.strategy = strategy
        self.is_global_zero = getattr(strategy, "is_client", True)
        self.loggers = loggers or []
        self.logged: list[dict[str, float]] = []
        self.current_epoch = 0
        self.global_step = 0
        self.sanity_checking = False
        self.state = SimpleNamespace(fn="fit")
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self._log_every = log_every
        self._batches = 0
        self._logger_connector = SimpleNamespace(log_metrics=self._log)

    def _log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append(dict(metrics))

    @property
    def should_update_logs(self) -> bool:
        return (self._batches + 1) % self._log_every == 0


def _connector_view(trainer: FakeTrainer) -> None:
    trainer._logger_connector.should_update_logs = trainer.should_update_logs


def record(meter: LinkMeter, clock: list, *, nbytes_dtype: tuple[int, torch.dtype], cut: str, kind: str, role: str,
           mb: int, posted: float, done: float) -> None:
    """Hand one real tensor of ``nbytes`` to the meter at time ``posted``; it completes at ``done``."""
    numel, dtype = nbytes_dtype
    meter_module.time = SimpleNamespace(perf_counter=lambda: posted)  # type: ignore[assignment]
    try:
        meter.record([SimpleNamespace(tensor=torch.zeros(numel, dtype=dtype))], cut=cut, kind=kind, role=role,
                     microbatch=mb)
    finally:
        meter_module.time = clock[0]
    meter.transfers[-1].done.append(done)


F32 = torch.float32


def client_batch(meter: LinkMeter, clock: list) -> None:
    """Two micro-batches seen from the client: 1000-byte up cut, 400-byte down cut, 20 ms of computation."""
    for mb, t0 in ((0, 0.000), (1, 0.010)):
        record(meter, clock, nbytes_dtype=(250, F32), cut="up", kind="activation", role="sent", mb=mb,
               posted=t0, done=t0 + (0.001 if mb == 0 else 0.0005))  # 1e6 and 2e6 B/s
        record(meter, clock, nbytes_dtype=(100, F32), cut="down", kind="activation", role="received", mb=mb,
               posted=t0 + 0.002, done=t0 + 0.002 + 0.00001)  # 4e7 B/s, received: not a client peak
    for mb, t0 in ((0, 0.031), (1, 0.035)):
        record(meter, clock, nbytes_dtype=(200, torch.bfloat16), cut="down", kind="gradient", role="sent", mb=mb,
               posted=t0, done=t0 + (0.0001 if mb == 0 else 0.0002))  # 4e6 and 2e6 B/s
        record(meter, clock, nbytes_dtype=(1000, torch.int8), cut="up", kind="gradient", role="received", mb=mb,
               posted=t0 + 0.001, done=0.050 + 0.01 * mb)
    meter.computes += [Compute("forward", 0, 0, 0.000, 0.004), Compute("forward", 0, 1, 0.004, 0.008),
                       Compute("forward", 2, 0, 0.020, 0.022), Compute("backward", 2, 0, 0.022, 0.026),
                       Compute("forward", 2, 1, 0.026, 0.028), Compute("backward", 2, 1, 0.028, 0.030),
                       Compute("backward", 0, 0, 0.051, 0.052), Compute("backward", 0, 1, 0.052, 0.053)]


CLIENT_COMPUTE = 0.004 + 0.004 + 0.002 + 0.004 + 0.002 + 0.002 + 0.001 + 0.001  # 0.020
CLIENT_SPAN = 0.060  # first record at 0.000 (posting), last at 0.060 (the second up gradient arrives)


def server_batch(meter: LinkMeter, clock: list) -> None:
    """The mirror on the server: 30 ms of computation, a peak receive of 5e6 B/s."""
    for mb, t0 in ((0, 0.0005), (1, 0.0105)):
        record(meter, clock, nbytes_dtype=(250, F32), cut="up", kind="activation", role="received", mb=mb,
               posted=t0, done=t0 + (0.0002 if mb == 0 else 0.0004))  # 5e6 and 2.5e6 B/s
        record(meter, clock, nbytes_dtype=(100, F32), cut="down", kind="activation", role="sent", mb=mb,
               posted=t0 + 0.008, done=t0 + 0.008 + 0.00001)  # 4e7 B/s, sent: not a server peak
        record(meter, clock, nbytes_dtype=(200, torch.bfloat16), cut="down", kind="gradient", role="received",
               mb=mb, posted=t0 + 0.02, done=t0 + 0.03)
        record(meter, clock, nbytes_dtype=(1000, torch.int8), cut="up", kind="gradient", role="sent", mb=mb,
               posted=t0 + 0.04, done=t0 + 0.045)
    meter.computes += [Compute("forward", 1, 0, 0.001, 0.008), Compute("forward", 1, 1, 0.011, 0.018),
                       Compute("backward", 1, 0, 0.032, 0.040), Compute("backward", 1, 1, 0.042, 0.050)]


SERVER_COMPUTE = 0.007 + 0.007 + 0.008 + 0.008  # 0.030
SERVER_SPAN = 0.0105 + 0.045 - 0.0005  # 0.0550: first posting 0.0005, last completion 0.0555


@pytest.fixture
def clock(monkeypatch):
    """Keeps the real ``time`` module of splitlit.meter to restore it after each fake posting."""
    monkeypatch.setattr(meter_module, "time", meter_module.time)
    return [meter_module.time]


def run_batch(cb, trainer: FakeTrainer, fill, clock) -> None:
    _connector_view(trainer)
    cb.on_train_batch_start(trainer, None, None, trainer._batches)
    if trainer.strategy.meter is not None:
        fill(trainer.strategy.meter, clock)
    cb.on_train_batch_end(trainer, None, None, None, trainer._batches)
    trainer._batches += 1


def two_ranks(cls, clock, *, batches: int, log_every: int = 1, hooks=None, loggers=None, **kwargs):
    """Run ``batches`` batches and one epoch end through a server and a client instance of ``cls``."""
    server = FakeTrainer(FakeStrategy(is_client=False, meter=LinkMeter()), log_every=log_every)
    client = FakeTrainer(FakeStrategy(is_client=True, meter=LinkMeter()), log_every=log_every, loggers=loggers)
    server_cb, client_cb = cls(**kwargs), cls(**kwargs)
    server_cb.setup(server, None, "fit")
    client_cb.setup(client, None, "fit")
    for _ in range(batches):
        run_batch(server_cb, server, server_batch, clock)
        if hooks:
            hooks(client_cb)
        client.strategy.peer = list(server.strategy.sent)
        server.strategy.sent.clear()
        run_batch(client_cb, client, client_batch, clock)
    server_cb.on_train_epoch_end(server, None)
    client.strategy.peer = list(server.strategy.sent)
    client_cb.on_train_epoch_end(client, None)
    return client, server


def test_summarize_counts_exact_bytes_microbatches_and_times(clock):
    """summarize() adds up the real tensors' bytes per flow, the computation and the span of the records."""
    meter = LinkMeter()
    client_batch(meter, clock)
    batch = summarize(meter.transfers, meter.computes)
    assert batch.flows == {"up.activation": 2000, "up.gradient": 2000, "down.activation": 800, "down.gradient": 800}
    assert batch.microbatches == 2
    assert batch.compute_s == pytest.approx(CLIENT_COMPUTE, abs=1e-12)
    assert batch.pipeline_s == pytest.approx(CLIENT_SPAN, abs=1e-12)
    assert batch.peak_send_Bps == pytest.approx(4e6)
    assert batch.peak_recv_Bps == pytest.approx(4e7)


def test_traffic_logs_bytes_per_chunk_and_the_reports_bandwidths(clock):
    """The client logs per-chunk bytes, average = bytes / both ranks' compute, client send peak, server receive peak."""
    def hooks(cb):  # the cut tensors without a codec: 1000-byte up activation, 400-byte down activation
        cb._head_output(None, None, torch.zeros(250, requires_grad=True))
        cb._tail_input(None, (torch.zeros(100, requires_grad=True),))

    client, server = two_ranks(LinkTrafficMonitor, clock, batches=1, hooks=hooks)
    step = client.logged[0]
    assert {k: step[k] for k in step if k.endswith("bytes_per_chunk")} == {
        "link/up_activation_bytes_per_chunk": 1000, "link/up_gradient_bytes_per_chunk": 1000,
        "link/down_activation_bytes_per_chunk": 400, "link/down_gradient_bytes_per_chunk": 400}
    assert step["link/bytes_per_batch"] == 5600
    assert step["link/compress_rate"] == 1.0
    assert step["link/bandwidth_avg_MBps"] == pytest.approx(5600 / (CLIENT_COMPUTE + SERVER_COMPUTE) / MB, rel=1e-12)
    assert step["link/bandwidth_peak_client_MBps"] == pytest.approx(4.0, rel=1e-9)
    assert step["link/bandwidth_peak_server_MBps"] == pytest.approx(5.0, rel=1e-9)
    assert server.logged == []  # only the client logs


def test_traffic_compress_rate_against_the_uncompressed_cut_tensors(clock):
    """With a codec the rate is bytes sent / bytes of the cut tensors; an int64 mask crosses forward only."""
    def hooks(cb):  # up cut: 2000-byte activation; down cut: 400-byte activation + a 64-byte int64 mask
        cb._head_output(None, None, torch.zeros(500, requires_grad=True))
        cb._tail_input(None, (torch.zeros(100, requires_grad=True), torch.zeros(8, dtype=torch.int64)))

    client, _ = two_ranks(LinkTrafficMonitor, clock, batches=1, hooks=hooks)
    raw = 2 * (2000 + 2000 + (400 + 64) + 400)
    assert client.logged[0]["link/compress_rate"] == pytest.approx(5600 / raw, rel=1e-12)


def test_traffic_epoch_and_run_figures_and_summary_file(clock, tmp_path):
    """Epoch figures cover every batch; the run summary leaves out the warm-up batch and lands in summary.json."""
    logger = CSVLogger(tmp_path)
    client, _ = two_ranks(LinkTrafficMonitor, clock, batches=3, loggers=[logger], warmup_batches=1)
    epoch = client.logged[-1]
    assert epoch["link/bytes_per_batch_epoch"] == 5600
    assert epoch["link/up_activation_bytes_per_chunk_epoch"] == 1000
    assert epoch["link/bandwidth_avg_MBps_epoch"] == pytest.approx(
        3 * 5600 / (3 * (CLIENT_COMPUTE + SERVER_COMPUTE)) / MB, rel=1e-9)
    assert epoch["link/bandwidth_peak_server_MBps_epoch"] == pytest.approx(5.0, rel=1e-9)
    summary = json.loads((tmp_path / "lightning_logs" / "version_0" / "summary.json").read_text())
    assert summary["link/bytes_per_batch_run"] == 5600
    assert summary["link/bandwidth_peak_client_MBps_run"] == pytest.approx(4.0, rel=1e-9)
    assert math.isnan(summary["link/compress_rate_run"])  # no hook saw the cut tensors


def test_traffic_gathers_only_on_logging_steps_and_epoch_end(clock):
    """Off the logging steps there is no collective: 4 batches logged every 2 -> 2 step gathers + 1 epoch gather."""
    client, server = two_ranks(LinkTrafficMonitor, clock, batches=4, log_every=2)
    assert len([m for m in client.logged if "link/bytes_per_batch" in m]) == 2
    assert len(client.strategy.sent) == 3


def test_traffic_without_a_split_warns_and_logs_nothing(clock):
    """A strategy without a link meter: one warning naming the strategy, then no keys and no collective."""
    trainer = FakeTrainer(SimpleNamespace(meter=None, is_client=True))
    cb = LinkTrafficMonitor()
    with pytest.warns(UserWarning, match="has no link meter"):
        cb.setup(trainer, None, "fit")
    run_batch(cb, trainer, None, clock)
    cb.on_train_epoch_end(trainer, None)
    assert trainer.logged == []


def test_timing_wall_compute_wait_and_bubble(clock, monkeypatch):
    """Wall time from the fake clock; compute, pipeline, waits and bubble from both ranks' records."""
    monkeypatch.setattr(timing_module, "time", FakeClock(10.0, 10.25, 20.0, 20.5))  # server, then client
    client, server = two_ranks(PipelineTimingMonitor, clock, batches=1, warmup_batches=0)
    step = client.logged[0]
    wait_client, wait_server = CLIENT_SPAN - CLIENT_COMPUTE, SERVER_SPAN - SERVER_COMPUTE
    expected = {
        "time/batch_s": 0.5,
        "time/compute_client_s": CLIENT_COMPUTE,
        "time/compute_server_s": SERVER_COMPUTE,
        "time/compute_s": CLIENT_COMPUTE + SERVER_COMPUTE,
        "time/pipeline_client_s": CLIENT_SPAN,
        "time/wait_client_s": wait_client,
        "time/wait_server_s": wait_server,
        "time/outside_client_s": 0.5 - CLIENT_SPAN,
        "time/bound_ratio": 0.5 / max(CLIENT_COMPUTE, SERVER_COMPUTE),
        "time/bubble": (wait_client + wait_server) / (CLIENT_SPAN + SERVER_SPAN),
    }
    assert step == pytest.approx(expected, abs=1e-12)
    assert client.logged[1] == pytest.approx({k + "_epoch": v for k, v in expected.items()}, abs=1e-12)
    assert server.logged == []


def test_timing_without_a_split_logs_wall_time_only(monkeypatch):
    """Unsplit: only time/batch_s, and no collective."""
    monkeypatch.setattr(timing_module, "time", FakeClock(1.0, 1.125))
    trainer = FakeTrainer(SimpleNamespace(meter=None, is_client=True))
    cb = PipelineTimingMonitor()
    cb.setup(trainer, None, "fit")
    run_batch(cb, trainer, None, None)
    assert trainer.logged == [{"time/batch_s": 0.125}]


def _validate(cb: BestMetric, trainer: FakeTrainer, epoch: int, **metrics: float) -> None:
    trainer.current_epoch, trainer.global_step = epoch, 10 * (epoch + 1)
    trainer.callback_metrics = {k.replace("_", "/"): torch.tensor(v) for k, v in metrics.items()}
    cb.on_validation_end(trainer, None)


def test_best_metric_tracks_best_epoch_and_final_value(tmp_path):
    """Best 0.7 at epoch 1 (a later tie does not move it), final 0.6, in the logs and in summary.json."""
    trainer = FakeTrainer(SimpleNamespace(is_client=True), loggers=[CSVLogger(tmp_path)])
    cb = BestMetric(monitor=["val/mcc", "val/acc"])
    for epoch, acc in enumerate([0.5, 0.7, 0.7, 0.6]):
        _validate(cb, trainer, epoch, val_acc=acc)
    expected = {"val/acc_best": 0.7, "val/acc_best_epoch": 1, "val/acc_best_step": 20, "val/acc_final": 0.6}
    assert trainer.logged[-1] == pytest.approx(expected)
    summary = json.loads((tmp_path / "lightning_logs" / "version_0" / "summary.json").read_text())
    assert summary == pytest.approx(expected)


def test_best_metric_min_mode_and_sanity_check_ignored():
    """mode='min' keeps the smallest loss; the sanity check's validation is not counted."""
    trainer = FakeTrainer(SimpleNamespace(is_client=True))
    cb = BestMetric(monitor="val/loss", mode="min")
    trainer.sanity_checking = True
    _validate(cb, trainer, 0, val_loss=0.01)
    trainer.sanity_checking = False
    for epoch, loss in enumerate([0.9, 0.4, 0.8]):
        _validate(cb, trainer, epoch, val_loss=loss)
    assert cb.best["val/loss"] == (pytest.approx(0.4), 1, 20)


def test_best_metric_refuses_when_no_monitored_metric_is_logged():
    """The error names the monitored keys and the keys that were logged."""
    trainer = FakeTrainer(SimpleNamespace(is_client=True))
    cb = BestMetric(monitor="val/mcc")
    with pytest.raises(MisconfigurationException, match=r"\['val/mcc'\].*Logged: \['val/acc'\]"):
        _validate(cb, trainer, 0, val_acc=0.5)


@pytest.mark.parametrize("cls", [LinkTrafficMonitor, PipelineTimingMonitor])
def test_warmup_batches_must_be_a_count(cls):
    """A negative warm-up is refused with the class name and the value."""
    with pytest.raises(ValueError, match=rf"{cls.__name__}\(warmup_batches=-1\)"):
        cls(warmup_batches=-1)


def test_best_metric_rejects_an_unknown_mode():
    """mode must be 'max' or 'min'."""
    with pytest.raises(ValueError, match=r"BestMetric\(mode='maximum'\)"):
        BestMetric(mode="maximum")
