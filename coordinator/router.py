"""The cluster's expert plane: each layer call's groups to the workers that own them, with failover.

`Router` is what offload_core's `ExpertRuntime` holds once workers join (an `ExpertPlane`). Per layer call it
decides once who computes each expert (`owners`: one read of the roster) and sends each live worker one request
with all of its groups and its share of the prefetch hint (capped at that worker's own slots); the experts the
coordinator keeps, or falls back to, go to its `LocalExperts`. A worker whose request fails, or passes its
deadline, is marked down in the roster and its groups are re-run on the next live replica or, when none is
left, as `Unavailable` says: computed by the coordinator from its own copy (LOCAL, the default), the step
fails naming the expert (FAIL), or the expert is dropped and the token's other experts re-weighted (DROP,
explicit: it changes the output).
"""
from __future__ import annotations

import enum
import logging
from collections import defaultdict
from typing import Iterable

import grpc
import torch

from ..offload_core.counters import ExpertCounters
from ..offload_core.local_experts import Hint, LocalExperts
from ..offload_core.runtime import LOCAL, LayerOutputs
from .remote import RemoteExperts, describe_error
from .roster import Roster

logger = logging.getLogger(__name__)

HERE = ""  # the coordinator itself, as an owner


class Unavailable(str, enum.Enum):
    """What happens to an expert whose workers are all down."""

    LOCAL = "local"  # the coordinator computes it from its own copy of the checkpoint (same tokens, slower)
    FAIL = "fail"  # the step fails with an error naming the expert
    DROP = "drop"  # the expert is dropped and the token's other experts re-weighted (changes the output)


class ExpertUnavailable(RuntimeError):
    """An expert with no live owner, and no fallback allowed."""


class WorkerRefused(ValueError):
    """A worker refused a request as invalid (INVALID_ARGUMENT, e.g. activations that overflow): the step's own
    fault, so no other worker would do better; it fails the step instead of being routed around."""


def _refusal(exc: Exception) -> str | None:
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)) \
            and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return exc.details()
    return None


class Router:
    """The plane of a model with workers: `roster` says who hosts what and who is up, `workers` reach them,
    `local` computes what the coordinator keeps."""

    def __init__(self, roster: Roster, workers: dict[str, RemoteExperts], local: LocalExperts,
                 unavailable: Unavailable = Unavailable.LOCAL):
        self.roster, self.workers, self.local = roster, workers, local
        self.unavailable = Unavailable(unavailable)

    # -- ownership ----------------------------------------------------------------------------
    def owners(self, layer: int, experts, hint: bool = False) -> dict[int, str | None]:
        """Who computes each of `experts`, read from the roster once: the first live worker hosting it; HERE for the
        coordinator; None when it is dropped. With no live owner and no fallback, ExpertUnavailable (a `hint` never
        raises: None instead)."""
        out = {}
        for e, (owners, live) in self.roster.placed(layer, experts).items():
            if not owners:
                out[e] = HERE
            elif live is not None:
                out[e] = live
            elif self.unavailable is Unavailable.LOCAL:
                out[e] = HERE
            elif self.unavailable is Unavailable.DROP or hint:
                out[e] = None
            else:
                raise ExpertUnavailable(f"expert (layer {layer}, expert {e}) has no live owner: its workers "
                                        f"{list(owners)} are down and local fallback is off (--no-local-fallback)")
        return out

    def _shares(self, layer: int, ranked: Iterable[int]) -> dict[str, list[int]]:
        """Each owner's share of a ranked prediction, in rank order; a worker's capped at its own slots per layer
        (the coordinator's share is capped by its slots' `prefetch`)."""
        out: dict[str, list[int]] = defaultdict(list)
        for e, owner in self.owners(layer, dict.fromkeys(ranked), hint=True).items():
            if owner == HERE or (owner is not None and len(out[owner]) < self.workers[owner].slots_per_layer):
                out[owner].append(e)
        return out

    # -- the plane ----------------------------------------------------------------------------
    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None) -> tuple[_Pending, list[int]]:
        by_owner: dict[str | None, dict[int, torch.Tensor]] = defaultdict(dict)
        for e, owner in self.owners(layer, groups).items():
            by_owner[owner][e] = groups[e]
        dropped = frozenset(by_owner.pop(None, {}))
        shares = self._shares(*hint) if hint is not None else {}
        parts = []
        for owner, owned in by_owner.items():  # workers first: their requests are in flight while we compute
            if owner == HERE:
                continue
            owned_hint = (hint[0], shares[owner]) if shares.get(owner) else None
            try:
                parts.append((owner, owned, self.workers[owner].submit(layer, owned, owned_hint)))
            except Exception as exc:  # could not even send: the same as a failed reply
                self.roster.mark_down(owner, describe_error(exc))
                parts.append((owner, owned, None))
        if HERE in by_owner:  # first in line: computed while the workers' replies are on their way
            parts.insert(0, (HERE, by_owner[HERE], self.local.submit(layer, by_owner[HERE])))
        hinted = []
        for owner, experts in shares.items():
            if owner == HERE:
                hinted += self.local.prefetch(hint[0], experts)
            else:
                hinted += experts
                if owner not in by_owner:
                    self._hint(owner, hint[0], experts)
        return _Pending(self, layer, parts, dropped), hinted

    def prefetch(self, layer: int, ranked: list[int], already: Iterable[int] = ()) -> list[int]:
        already = set(already)
        predicted = []
        for owner, owned in self._shares(layer, ranked).items():
            if owner == HERE:
                predicted += self.local.prefetch(layer, owned, skip=already)
                continue
            fresh = [e for e in owned if e not in already]
            if fresh:
                self._hint(owner, layer, fresh)
            predicted += owned
        return predicted

    def _hint(self, owner: str, layer: int, experts: list[int]) -> None:
        try:
            self.workers[owner].prefetch(layer, experts)
        except Exception as exc:  # a hint to a failing worker: mark it, never fail the step for it
            self.roster.mark_down(owner, describe_error(exc))

    def rerun(self, layer: int, groups: dict[int, torch.Tensor]) -> LayerOutputs:
        """Groups whose worker failed: to the next live replica, or as `unavailable` says."""
        return self.submit(layer, groups, None)[0].result()

    # -- reporting ----------------------------------------------------------------------------
    def counters(self) -> dict[int, ExpertCounters]:
        """Every backend's slots per layer: the coordinator's and each worker's own."""
        out: dict[int, ExpertCounters] = defaultdict(ExpertCounters)
        for per_layer in [self.local.counters(), *(b.layer_counters() for b in self.workers.values())]:
            for layer, c in per_layer.items():
                out[layer] = out[layer] + c
        return dict(out)

    def backends(self) -> dict[str, dict]:
        return {LOCAL: self.local.describe(), **self.describe()}

    def describe(self) -> dict[str, dict]:
        """Each worker: its client's figures, its roster state, its share and what was pushed to it."""
        out = {}
        roster = self.roster
        for name, backend in self.workers.items():
            state = roster.states[name]
            out[name] = {**backend.describe(), "failures": roster.failures.get(name, 0), "down": name in roster.down,
                         "hosted": len(roster.hosted(name)), "state": state.state, "since": state.since,
                         "detail": state.detail, "pushed_bytes": state.pushed_bytes, "push_s": state.push_s}
        return out

    def close(self) -> None:
        for backend in self.workers.values():
            backend.close()


class _Pending:
    """One layer's requests. A worker that fails has its groups re-run elsewhere."""

    def __init__(self, router: Router, layer: int, parts: list[tuple[str, dict, object]], dropped: frozenset[int]):
        self.router, self.layer, self.parts, self.dropped = router, layer, parts, dropped

    def result(self) -> LayerOutputs:
        outputs: dict[int, torch.Tensor] = {}
        dropped = set(self.dropped)
        for owner, groups, pending in self.parts:
            if owner == HERE:
                outputs.update(pending.result())
                continue
            if pending is not None:
                try:
                    outputs.update(pending.result())
                    continue
                except Exception as exc:  # a worker died, hung past its deadline, or lost its experts
                    refused = _refusal(exc)
                    if refused is not None:
                        raise WorkerRefused(f"worker {owner} refused layer {self.layer}'s request: {refused}") from exc
                    self.router.roster.mark_down(owner, describe_error(exc))
            again = self.router.rerun(self.layer, groups)  # not sent, or failed: the next owner
            outputs.update(again.outputs)
            dropped |= again.dropped
        return LayerOutputs(outputs, frozenset(dropped))
