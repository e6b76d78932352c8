"""Which part of a client's adapter is shared with the federation, per personalization strategy.

- ``fedavg``: every LoRA weight is shared; each client's last local (DP) training on top of
  the global adapter is its personalization.
- ``fedsa``: only the LoRA A matrices are shared (FedSA-LoRA: A learns general knowledge,
  B client-specific); B never leaves the client.
- ``ditto``: every LoRA weight of a global copy is shared; each client also keeps a fully
  personal adapter, trained next to the global one with a proximal pull towards it.
"""

from __future__ import annotations

from collections.abc import Callable

STRATEGIES = ("fedavg", "fedsa", "ditto")


def is_lora_a(name: str) -> bool:
    """``models.lora.is_lora_a``, here so that the server's side imports no peft or torch."""
    return ".lora_A." in name


def shared_predicate(strategy: str) -> Callable[[str], bool]:
    """A test on adapter weight names: True for the names this strategy shares."""
    if strategy == "fedsa":
        return is_lora_a
    if strategy in ("fedavg", "ditto"):
        return lambda name: True
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def shared_part(arrays: dict, strategy: str) -> dict:
    keep = shared_predicate(strategy)
    return {name: value for name, value in arrays.items() if keep(name)}
