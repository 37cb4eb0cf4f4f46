"""Where routed and fused shared experts sit in the fused-MoE layer's expert slots.

With shared experts fused into the routed call, a layer holds ``E`` routed experts and ``S``
shared pseudo-experts (one per ``moe_intermediate_size`` slice of the shared FFN), and vLLM
places the ``E + S`` slots over the ``ep`` expert-parallel ranks linearly: rank ``r`` owns
slots ``[r * L, (r + 1) * L)``, ``L = (E + S) / ep`` (ERNIE has no expert groups, so vLLM's
round-robin placement falls back to linear). Every rank gets ``E / ep`` routed experts and
``S / ep`` shared slices, so each rank's shared work is equal and the EP all-reduce sums the
slices into the whole shared FFN:

    routed expert e -> slot e + (e // (E/ep)) * (S/ep)
    shared slice  j -> slot (j // (S/ep)) * L + E/ep + j % (S/ep)

Without expert parallelism (``ep`` = 1) that is slot ``e`` and ``E + j``. Fusion under EP
needs ``ep`` to divide both ``E`` and ``S`` (21B-A3B: EP=2; with EP=4 its two shared slices
would sit on two of the four ranks). No vLLM import: the GPU tuner uses this too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FusedExpertLayout:
    num_routed: int
    num_shared: int
    ep_size: int = 1

    def __post_init__(self) -> None:
        reason = unfusable_reason(self.num_routed, self.num_shared, self.ep_size)
        if reason:
            raise ValueError(reason)

    @property
    def routed_per_rank(self) -> int:
        return self.num_routed // self.ep_size

    @property
    def shared_per_rank(self) -> int:
        return self.num_shared // self.ep_size

    @property
    def slots_per_rank(self) -> int:
        return self.routed_per_rank + self.shared_per_rank

    # The two slot maps are elementwise: an int, or an integer tensor of them (the torch
    # router maps its chosen ids on the device with these; the Triton kernel restates them).
    def routed_slot(self, expert):
        return expert + (expert // self.routed_per_rank) * self.shared_per_rank

    def shared_slot(self, index):
        rank, within = index // self.shared_per_rank, index % self.shared_per_rank
        return rank * self.slots_per_rank + self.routed_per_rank + within

    @property
    def shared_slots(self) -> list[int]:
        return [self.shared_slot(j) for j in range(self.num_shared)]

    def rank_slots(self, rank: int) -> range:
        """The slots EP rank ``rank`` holds (vLLM's linear placement)."""
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)


def unfusable_reason(num_routed: int, num_shared: int, ep_size: int) -> str | None:
    """Why ``num_shared`` shared slices cannot be spread evenly over ``ep_size`` ranks beside
    ``num_routed`` routed experts (None: they can)."""
    if num_shared <= 0 or num_routed <= 0 or ep_size <= 0:
        return f"no layout for {num_routed} routed / {num_shared} shared experts over EP={ep_size}"
    if num_routed % ep_size or num_shared % ep_size:
        return (
            f"expert parallel size {ep_size} does not divide both the {num_routed} routed "
            f"experts and the {num_shared} shared-expert slices"
        )
    return None
