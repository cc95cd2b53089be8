"""Lightning callbacks that measure what crosses the link between client and server, and how training went.

- :class:`LinkTrafficMonitor`: bytes per chunk on each cut and direction, compression rate, average and peak
  bandwidth.
- :class:`PipelineTimingMonitor`: wall time per batch, each rank's computation and waiting, the pipeline bubble.
- :class:`BestMetric`: best epoch and value of validation metrics, and their final value, in the run summary.
- :class:`CodecCalibration`: fits the model's codecs to the activations they will carry, before fitting.
- :class:`LeakageMonitor`: what the server could learn from the cuts (label AUC, dCor, reconstruction, tokens).
- :class:`Defences`: the client's defences against it (NoPeek, Gaussian noise), off by default.
"""

from callbacks.best_metric import BestMetric
from callbacks.codec_calibration import CodecCalibration
from callbacks.defences import Defences
from callbacks.leakage_monitor import LeakageMonitor
from callbacks.link_traffic_monitor import LinkTrafficMonitor
from callbacks.pipeline_timing_monitor import PipelineTimingMonitor

__all__ = ["BestMetric", "CodecCalibration", "Defences", "LeakageMonitor", "LinkTrafficMonitor",
           "PipelineTimingMonitor"]
