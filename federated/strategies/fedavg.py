"""FedAvg (FL-MR): the base strategy unchanged -- all weights shared, averaged after every round."""
from federated.strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"
    summary = "FedAvg (FL-MR): every client trains locally, then all weights are averaged"
