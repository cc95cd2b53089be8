"""The server follows the client's decisions: callbacks that read metrics, and whether to resume.

``ModelCheckpoint`` and ``EarlyStopping`` read metrics, which exist on the client only. Their hooks run there;
the client announces each collective a hook makes (a save, a decision, a broadcast) and ends with "done" and
its ``trainer.should_stop``, and the server takes part in each: it learns what was decided, never the values.
Likewise only the client resolves ``ckpt_path`` (on two hosts the server has no file) and tells the server
whether to resume.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, Trainer

from splitlit.split import CLIENT_RANK

if TYPE_CHECKING:
    from splitlit.strategy import SplitPipelineStrategy

__all__ = ["BROADCAST", "DECIDE", "SAVE", "follow_client_resume", "lead_or_follow"]

DONE, SAVE, DECIDE, BROADCAST = 0, 1, 2, 3
_LED_HOOKS = ("on_train_batch_end", "on_train_epoch_end", "on_validation_end", "on_train_end")


def lead_or_follow(callback: Callback, strategy: SplitPipelineStrategy) -> None:
    """Run a metric-reading callback's hooks on the client only; the server repeats its collectives, in order.

    The client runs the hook and announces each collective it makes (a save, a decision, a broadcast), then
    "done" with its ``trainer.should_stop``; the server takes part in each and learns the decisions, never the
    metrics. Replaced on the instance, so Lightning still sees a ``ModelCheckpoint`` or ``EarlyStopping``.
    """
    for name in _LED_HOOKS:
        hook = getattr(callback, name)
        if getattr(hook, "_split_led", False):
            continue
        led = functools.partial(_led_hook, hook, strategy, per_batch=name == "on_train_batch_end")
        led._split_led = True  # type: ignore[attr-defined]
        setattr(callback, name, led)


def _led_hook(hook: Callable, strategy: SplitPipelineStrategy, trainer: Trainer, *args: Any, per_batch: bool = False,
              **kwargs: Any) -> None:
    channel = strategy._channel
    assert channel is not None
    if per_batch and strategy.many:
        return  # many clients step different numbers of batches: they checkpoint at rounds' ends only
    strategy._protocol = True
    try:
        if strategy.global_rank == CLIENT_RANK:  # client 0 leads; the server and any other clients follow
            hook(trainer, *args, **kwargs)
            with strategy._link_errors("the end of a checkpoint or early-stopping decision"):
                channel.broadcast_numbers([DONE, int(trainer.should_stop)], length=2, src=CLIENT_RANK, what="decision")
            return
        while True:
            with strategy._link_errors("waiting for the client's checkpoint or early-stopping decision"):
                op, arg = channel.broadcast_numbers(None, length=2, src=CLIENT_RANK, what="decision")
            if op == DONE:
                trainer.should_stop = bool(arg)
                return
            if op == SAVE:
                trainer.save_checkpoint("<written by the client>", weights_only=bool(arg))
            elif op == DECIDE:
                strategy.reduce_boolean_decision(False)
            elif op == BROADCAST:
                strategy.broadcast(None)
            else:
                raise RuntimeError(f"The client sent an unknown callback step {op}: both ranks must run the same "
                                   f"splitlit version.")
    finally:
        strategy._protocol = False


def follow_client_resume(trainer: Trainer, strategy: SplitPipelineStrategy) -> None:
    """Only the client resolves and reads ``ckpt_path``; the server resumes exactly when the client does."""
    connector = trainer._checkpoint_connector
    original = getattr(connector.resume_start, "_split_original", connector.resume_start)

    def resume_start(checkpoint_path: Any = None, weights_only: bool | None = None) -> None:
        assert strategy._channel is not None
        resumes = [int(bool(checkpoint_path))] if strategy.global_rank == 0 else None
        (resumes,) = strategy._channel.broadcast_numbers(resumes, length=1, src=CLIENT_RANK, what="decision")
        if not strategy.is_client:
            checkpoint_path = "<read by the client>" if resumes else None
        original(checkpoint_path, weights_only)

    resume_start._split_original = original  # type: ignore[attr-defined]
    connector.resume_start = resume_start
