"""A process group of the trainer's sending rank and the engines' GPUs, apart from torchrun's world.

The engines (SGLang `/init_weights_update_group`, or our local server) join the same TCP
store at `master_address:master_port` and the same `group_name` prefix; the trainer is
rank 0. torch has no public API for a second, independent world, so this uses the same private
helper SGLang's receiving side uses (`_new_process_group_helper`) on the store its `rendezvous` makes
(a multi-tenant `TCPStore` that rank 0 serves), which keeps both sides' store keys identical. The store
is built directly rather than through `rendezvous`: under torchrun (TORCHELASTIC_USE_AGENT_STORE)
`rendezvous` would make every rank, rank 0 included, a client of a store nobody serves at that port.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def new_weight_update_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "nccl",
    timeout: timedelta = timedelta(minutes=10),
    rendezvous_timeout: timedelta | None = None,
) -> dist.ProcessGroup:
    """Join (rank 0: host) the weight-update group; blocks until all `world_size` ranks have joined, for at
    most `rendezvous_timeout` (default `timeout`, which then bounds each collective)."""
    joining = rendezvous_timeout or timeout
    store = dist.TCPStore(
        host_name=master_address,
        port=master_port,
        world_size=world_size,
        is_master=rank == 0,
        timeout=joining,
        multi_tenant=True,
    )
    prefixed = c10d.PrefixStore(group_name, store)
    params = inspect.signature(c10d._new_process_group_helper).parameters
    options = {"backend_options": None} if "backend_options" in params else {"pg_options": None}
    group, _ = c10d._new_process_group_helper(
        world_size,
        rank,
        [],
        c10d.Backend(backend),
        prefixed,
        group_name=group_name,
        timeout=timeout,
        **options,
    )
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    store.set_timeout(timeout)
    return group


def bind_gloo_to(address: str) -> str | None:
    """Make this process's gloo sockets listen on the network interface that holds `address` (through
    GLOO_SOCKET_IFNAME, unless it is set already); returns the interface. A wildcard address, or one no
    interface holds, leaves gloo's default, the interface of the host name."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    try:
        ip = ipaddress.ip_address("127.0.0.1" if address == "localhost" else address)
    except ValueError:
        return None
    if ip.is_unspecified:
        return None
    for interface, addresses in psutil.net_if_addrs().items():
        for a in addresses:
            try:
                if ipaddress.ip_address(a.address.split("%")[0]) == ip:
                    os.environ["GLOO_SOCKET_IFNAME"] = interface
                    return interface
            except ValueError:  # a MAC address
                continue
    return None


def broadcast_from_trainer(
    group: dist.ProcessGroup,
    tensor: torch.Tensor,
    timeout: float | None = None,
    give_up: Callable[[], str | None] | None = None,
) -> None:
    """Broadcast `tensor` from group rank 0 in place (works without torchrun's default group). With `timeout`
    (seconds) a broadcast not complete by then raises `TimeoutError`, and so does one for which `give_up()`
    returns a reason (a member that will never take part); the group is then unusable (abort it).

    A member whose process died is often reported by its HTTP reply a moment before the broadcast itself
    fails on the closed connection. The broadcast gets `GIVE_UP_GRACE` seconds to end on its own: one
    that ended with an error raises it (the group is not stuck, and destroying it frees the other members
    at once); only one still running after the grace is given up as stuck."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    work = group.broadcast([tensor], opts)
    if timeout is not None or give_up is not None:
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        reason = None
        while not work.is_completed():  # NCCL's wait() blocks the stream, not this thread, without a bound
            now = time.monotonic()
            if now > deadline:
                if reason:
                    raise TimeoutError(f"the weight broadcast was given up: {reason}")
                raise TimeoutError(f"the weight broadcast did not complete within {timeout:g}s")
            if reason is None and give_up is not None and (reason := give_up()):
                deadline = min(deadline, now + GIVE_UP_GRACE)
            time.sleep(0.001)
    work.wait()


GIVE_UP_GRACE = 2.0  # seconds a given-up broadcast may take to fail by itself (a dead member's closed socket)


def abort_group(group: dist.ProcessGroup, backend: str, *, stuck: bool, timeout: float) -> None:
    """Tear down a group whose collective failed (`stuck` False: it ended with an error) or did not end
    (`stuck` True), without waiting for it: NCCL's communicator is aborted (a destroy would wait on the stuck
    kernel); a gloo group is destroyed, which closes its connections, so members still receiving fail at once.
    A stuck gloo operation cannot be cut short: the group's object, whose destructor waits for it, is released
    by a daemon timer after the group's own `timeout` (seconds) ended the operation."""
    if backend == "nccl":
        c10d._abort_process_group(group)
        return
    dist.destroy_process_group(group)
    if stuck:
        _PARKED.append(group)
        timer = threading.Timer(timeout + 5.0, _PARKED.remove, args=(group,))
        timer.daemon = True
        timer.start()


_PARKED: list[dist.ProcessGroup] = []  # aborted gloo groups whose last operation may still be running
