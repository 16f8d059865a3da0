"""The registry of federated methods: one file each, one line here."""
from federated.strategies.base import Strategy
from federated.strategies.fedavg import FedAvg
from federated.strategies.mrcm import MRCM
from federated.strategies.fedprox import FedProx
from federated.strategies.fedbn import FedBN
from federated.strategies.fedmri import FedMRI
from federated.strategies.pfl import PersonalizedFL
from federated.strategies.pflsynth import PFLSynth
from federated.strategies.local import Local
from federated.strategies.central import Central

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in [
    FedAvg,
    MRCM,
    FedProx,
    FedBN,
    FedMRI,
    PersonalizedFL,
    PFLSynth,
    Local,
    Central,
]}


def describe() -> str:
    """One line per method, for `--strategy list`."""
    width = max(map(len, STRATEGIES))
    return "\n".join(f"{name.ljust(width)}  {cls.summary}" for name, cls in STRATEGIES.items())
