"""The registry of federated methods: one file each, one line here."""
from federated.strategies.base import Strategy
from federated.strategies.fedavg import FedAvg
from federated.strategies.mrcm import MRCM

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in [
    FedAvg,
    MRCM,
]}


def describe() -> str:
    """One line per method, for `--strategy list`."""
    width = max(map(len, STRATEGIES))
    return "\n".join(f"{name.ljust(width)}  {cls.summary}" for name, cls in STRATEGIES.items())
