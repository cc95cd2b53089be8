"""Two hosts on one machine: run a client/server job over an emulated link (rate, delay, jitter, loss).

    sudo python -m splitlit.link --bandwidth 10mbit --delay 25ms -- \\
        python -m experiments.cifar10_mobilenet fit --config experiments/configs/cifar10_small.yaml

What the command does, in order:

1. two network namespaces, the client's and the server's "host"; the client's interface is ``sl-client`` with
   10.77.0.1, the server's ``sl-server`` with 10.77.0.2 (these addresses exist only inside the two namespaces,
   which have no route anywhere else). What joins them (:mod:`splitlit.link.shaped`):

   - a rate alone: a veth pair with ``tc tbf`` on both ends (each direction shaped where it leaves, at ``--up``
     / ``--down``, or ``--bandwidth`` for both);
   - a delay, jitter or loss: the userspace delay line (:mod:`splitlit.link.delayline`): a TUN device in each
     namespace and one process that holds each packet for its serialisation at the rate plus the one-way delay,
     drops it at random or when the queue is full, and never reorders a direction. This kernel has no
     ``netem`` (nor ``fq``); ``--emulator netem`` uses netem where a kernel has it;
2. a probe: small UDP round trips (the round trip and each one-way delay), then a TCP stream each way
   (``--probe-seconds``; 0 skips it);
3. the command twice, once in each namespace, through the multi-host path: ``NODE_RANK`` 0 (client) or 1
   (server), ``LOCAL_RANK=0``, ``WORLD_SIZE=2``, ``MASTER_ADDR`` = the client's address, ``GLOO_SOCKET_IFNAME``
   = that namespace's interface, and ``SPLITLIT_LINK_JSON`` = the link's settings and the probe's result,
   which :mod:`experiments.cli` records in the run config (W&B config, ``run.json``) and ``summary.json``. A
   LightningCLI command (one naming ``fit``, ``validate``, ``test`` or ``predict``) gets
   ``--trainer.num_nodes 2 --trainer.devices 1`` appended; any other script must build
   ``Trainer(num_nodes=2, devices=1)`` itself. Output lines are prefixed ``[client]`` / ``[server]``;
4. removes both namespaces, and with them the interfaces, qdiscs and the delay line, when the job ends, fails
   or is interrupted (SIGINT, SIGTERM, SIGHUP): the ranks are stopped first. If the command itself is killed
   with ``kill -9``, the ranks and the delay line die with it and the delay line removes the namespaces; the
   next launch (or ``python -m splitlit.link --cleanup``) removes what any killed run left.

Needs Linux, root (or CAP_NET_ADMIN + CAP_SYS_ADMIN), iproute2's ``ip`` and ``tc``, and for the delay line
``/dev/net/tun``.
"""

from splitlit.link.errors import LinkError
from splitlit.link.job import run_two_hosts, with_trainer_args
from splitlit.link.netns import check_requirements, interface_bytes, remove_stale_links
from splitlit.link.shaped import LINK_ENV, ShapedLink
from splitlit.link.spec import IFNAME, LinkSpec
from splitlit.link.units import parse_delay, parse_rate

__all__ = ["IFNAME", "LINK_ENV", "LinkError", "LinkSpec", "ShapedLink", "check_requirements", "interface_bytes",
           "parse_delay", "parse_rate", "remove_stale_links", "run_two_hosts", "with_trainer_args"]
