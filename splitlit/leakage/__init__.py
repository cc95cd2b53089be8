"""What an honest-but-curious server can learn from what crosses the cuts, and the client's defences.

- :mod:`splitlit.leakage.attacks`: pure functions that score the attacks (label AUC from the down-cut gradients,
  distance correlation and reconstruction from the up-cut activations, token recovery for text).
- :mod:`splitlit.leakage.view`: which modules produce what the server receives, and the server's decoded view.
- :mod:`splitlit.leakage.defences`: hooks on the client's modules (NoPeek, Gaussian noise), off by default.

The monitor that runs the attacks during a fit is :class:`callbacks.LeakageMonitor`; the defences are turned on
with :class:`callbacks.Defences`.
"""

from splitlit.leakage.attacks import (ATTACKS, distance_correlation, image_grid, label_auc_cosine, label_auc_norm,
                                      make_decoder, per_sample, reconstruction_scores, token_candidates,
                                      token_recovery, train_decoder)
from splitlit.leakage.defences import activation_noise, gradient_noise, nopeek
from splitlit.leakage.view import down_cut_module, received_view, server_decoded, simulate_wire, up_cut_module

__all__ = ["ATTACKS", "activation_noise", "distance_correlation", "down_cut_module", "gradient_noise",
           "image_grid", "label_auc_cosine", "label_auc_norm", "make_decoder", "nopeek", "per_sample",
           "received_view", "reconstruction_scores", "server_decoded", "simulate_wire", "token_candidates",
           "token_recovery", "train_decoder", "up_cut_module"]
