"""Two hosts on one machine: run a client/server job over an emulated, bandwidth-limited link.

    sudo python -m splitlit.link --bandwidth 100mbit -- \\
        python -m experiments.cifar10_mobilenet fit --config experiments/configs/cifar10_small.yaml

What the command does, in order:

1. two network namespaces, the client's and the server's "host", joined by a veth pair; the client's end is
   ``sl-client`` with 10.77.0.1, the server's ``sl-server`` with 10.77.0.2 (these addresses exist only inside
   the two namespaces, which have no route anywhere else);
2. ``tc tbf`` at ``--bandwidth`` on both ends (each direction is shaped where it leaves), so the client -> server
   and the server -> client directions each carry at most that rate, like a full-duplex line;
3. a short TCP probe of the throughput each way (``--probe-seconds``; 0 skips it);
4. the command twice, once in each namespace, through the multi-host path: ``NODE_RANK`` 0 (client) or 1
   (server), ``LOCAL_RANK=0``, ``WORLD_SIZE=2``, ``MASTER_ADDR`` = the client's address, ``GLOO_SOCKET_IFNAME``
   = that namespace's end of the pair, and ``SPLITLIT_LINK_JSON`` = the link's settings and the probe's result,
   which :mod:`experiments.cli` records in the run config (W&B config and ``run.json``). A LightningCLI command
   (one naming ``fit``, ``validate``, ``test`` or ``predict``) gets ``--trainer.num_nodes 2 --trainer.devices 1``
   appended; any other script must build ``Trainer(num_nodes=2, devices=1)`` itself. Output lines are prefixed
   ``[client]`` / ``[server]``;
5. removes both namespaces, and with them the veth pair and its qdiscs, when the job ends, fails or is
   interrupted (SIGINT, SIGTERM, SIGHUP): the ranks are stopped first. A ``kill -9`` of this command itself leaves
   them behind; ``python -m splitlit.link --cleanup`` removes those of runs that are gone.

Latency: ``--delay`` adds a one-way delay on each end with ``netem`` where the kernel has it. Kernels without
``sch_netem`` (like the one these experiments were run on) cannot delay packets with ``tc`` at all (``fq``, which
could pace by timestamp, is missing too), so there ``--delay`` fails with a clear error and only the bandwidth is
emulated: the round trip is the veth's, tens of microseconds.

Needs Linux, root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2's ``ip`` and ``tc``.
"""

from splitlit.link.errors import LinkError
from splitlit.link.job import run_two_hosts, with_trainer_args
from splitlit.link.netns import check_requirements, interface_bytes, remove_stale_links
from splitlit.link.shaped import LINK_ENV, ShapedLink
from splitlit.link.spec import IFNAME, LinkSpec
from splitlit.link.units import parse_delay, parse_rate

__all__ = ["IFNAME", "LINK_ENV", "LinkError", "LinkSpec", "ShapedLink", "check_requirements", "interface_bytes",
           "parse_delay", "parse_rate", "remove_stale_links", "run_two_hosts", "with_trainer_args"]
