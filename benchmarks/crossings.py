"""`python -m moeshard.benchmarks.crossings`: how the hot path of one MoE layer call crosses files.

The bundled demo model with one local `moe-worker` (started with `--model`, so nothing is pushed) hosting half the
experts, prefetch on; one forward of a 32-token prompt is traced with `sys.setprofile` in the coordinator's process.
Printed per MoE layer call: the calls from one file of `offload_core`/`coordinator` into another on the expert
plane's path (the plane, its backends and the cluster's records; the slots, kernels and formats below them
excluded), and how often ownership was decided. (The README's design section quotes the result.)
"""
from __future__ import annotations

import collections
import sys

PATH_FILES = ("moe_layer.py", "runtime.py", "local_experts.py", "remote.py", "cluster.py", "router.py", "roster.py")
DECISIONS = ("owner", "owners", "partition", "_hints", "_shares")


def _file(code) -> str | None:
    name = code.co_filename
    for package in ("offload_core", "coordinator"):
        if f"/{package}/" in name:
            tail = name.rsplit(f"/{package}/", 1)[1]
            return f"{package}/{tail}" if tail in PATH_FILES else None
    return None


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..coordinator.cluster import ClusterConfig, join_workers
    from ..coordinator.local_workers import LocalWorkers
    from ..coordinator.placement import ClusterSpec
    from ..offload_core import load_model
    from ..offload_core.demo import demo_model_path

    model = demo_model_path()
    with LocalWorkers(1, model) as workers, load_model(model, slots_per_layer=2, prefetch=2) as om:
        join_workers(om, ClusterConfig(ClusterSpec(tuple(workers.addresses), local_share=0.5)))
        ids = torch.randint(0, om.model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            om(ids)  # warm: connections, slots
        crossings, decisions, layers = collections.Counter(), collections.Counter(), [0]

        def profile(frame, event, arg):
            if event != "call" or frame.f_back is None:
                return
            callee = _file(frame.f_code)
            if callee is None:
                return
            name = frame.f_code.co_name
            if callee.endswith("moe_layer.py") and name == "__call__":
                layers[0] += 1
            if name in DECISIONS:
                decisions[name] += 1
            caller = _file(frame.f_back.f_code)
            if caller is not None and caller != callee:
                crossings[(caller, callee, name)] += 1

        sys.setprofile(profile)
        try:
            with torch.no_grad():
                om(ids)
        finally:
            sys.setprofile(None)
    n = max(1, layers[0])
    print(f"{layers[0]} MoE layer calls; per call: {sum(crossings.values()) / n:.1f} calls from one file into another, "
          "ownership decided " + ", ".join(f"{name} x{count / n:.1f}" for name, count in sorted(decisions.items())))
    for (caller, callee, name), count in sorted(crossings.items(), key=lambda kv: -kv[1]):
        print(f"  {count / n:5.1f}  {caller} -> {callee}:{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
