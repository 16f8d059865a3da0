"""FL-MRCM (Guo et al., CVPR 2021): FedAvg plus cross-site modelling. Every source client keeps its own
discriminator (never averaged) that tells its U-Net bottleneck latents from the target site's; the
U-Net learns to reconstruct its own data while making both latents fool that discriminator, so the
shared encoder maps every site into the target's latent distribution. Target images carry no labels.

A client that is itself the target site trains with the supervised loss only, as in the paper.

`--mrcm_target images` (the paper's simulation): each source reads unlabelled target images and the
adversarial gradient moves the encoder on both sources' and target's images.
`--mrcm_target features`: at the start of each round the target site encodes its images with the
current global model and shares only the pooled latent vectors (`site_context`, run where the
target's data is: in this process, or on the target's own Flower node); the server forwards that
bank to the source clients (`round_payload`). No target image leaves the target site, and only the
source latents are pulled towards the (fixed for the round) target latents.
"""
from __future__ import annotations

import zlib
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from federated import distributed
from federated.client import Client, make_loader
from federated.domain_gap import pooled_latents
from federated.experiment import Experiment, site_train_set
from federated.strategies.base import State, Strategy
from models.discriminator import LatentDiscriminator, pool_latent
from utils.errors import UserError

SOURCE, TARGET = 0, 1  # discriminator classes


class MRCM(Strategy):
    name = "mrcm"
    dpsgd_refusal = ("its discriminator trains on the client's latents outside Opacus's per-sample clipping; "
                     "use --strategy fedavg")
    summary = ("FL-MRCM: FedAvg + a local discriminator per source client aligning U-Net latents "
               "with the target site's")

    def __init__(self, opts):
        super().__init__(opts)
        if not self.task.has_latent:
            raise UserError(f"--strategy mrcm aligns a latent of the model; the {self.task.name} task "
                            "defines none yet: choose another --strategy")
        # Draws the seed of each round's target bank (server side in features mode).
        self.bank_generator = torch.Generator().manual_seed(_seed(opts.seed, "bank"))
        self.bank: torch.Tensor | None = None

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--lambda_adv", type=float, default=1.0,
                           help="weight of the adversarial loss on the U-Net (0: FL-MR's updates exactly)")
        group.add_argument("--disc_lr_mult", type=float, default=10.0,
                           help="discriminator learning rate as a multiple of --lr (RMSprop; the paper's 10, with "
                                "--lr 1e-4). At --lr 1e-3, 10x makes the discriminator oscillate: try 3")
        group.add_argument("--mrcm_target", choices=["images", "features"], default="images",
                           help="what the target site shares: unlabelled images (paper), or only "
                                "latent vectors computed by the global model each round")
        group.add_argument("--mrcm_bank", type=int, default=512,
                           help="with --mrcm_target features: latent vectors the target shares per round")

    def prepare(self, exp: Experiment, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.target_site = exp.test_site
        if self.opts.mrcm_target == "images":
            # Undersampled like any training input; only the model inputs are read, never the target.
            self.target_images = site_train_set(exp, exp.test_site, self.opts)

    def is_source(self, client: Client) -> bool:
        return client.site != self.target_site

    def init_client(self, client: Client, model: nn.Module) -> None:
        if not self.is_source(client):
            return
        # Its own seed: creating discriminators must not shift the random numbers U-Net training uses.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.opts.seed, client.name))
            disc = LatentDiscriminator(in_features=4 * model.latent_channels).to(self.device)
        client.extra = {
            "disc": disc,
            "disc_opt": torch.optim.RMSprop(disc.parameters(), lr=self.opts.lr * self.opts.disc_lr_mult),
            "target_generator": torch.Generator().manual_seed(_seed(self.opts.seed, "target-" + client.name)),
        }

    def client_state(self, client: Client) -> dict:
        if not client.extra:
            return {}
        return {"disc": client.extra["disc"].state_dict(), "disc_opt": client.extra["disc_opt"].state_dict(),
                "target_generator": client.extra["target_generator"].get_state()}

    def load_client_state(self, client: Client, state: dict) -> None:
        # A test of a checkpoint may name another target site: a client's role can differ from
        # training, and its discriminator is then not needed.
        if state and client.extra:
            client.extra["disc"].load_state_dict(state["disc"])
            client.extra["disc_opt"].load_state_dict(state["disc_opt"])
            client.extra["target_generator"].set_state(state["target_generator"])

    def state_dict(self) -> dict:
        return {"bank_generator": self.bank_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.bank_generator.set_state(state["bank_generator"])

    def federation_refusal(self) -> str | None:
        if self.opts.mrcm_target == "images":
            return ("--mrcm_target images does not run on Flower: every source client would read the target "
                    "site's images; use --mrcm_target features (only pooled latent vectors leave the target)")
        return None

    def context_sites(self, rnd: int, exp: Experiment) -> dict[str, int]:
        if self.opts.mrcm_target != "features":
            return {}
        return {exp.test_site: int(torch.randint(2**31 - 1, (1,), generator=self.bank_generator))}

    def site_context(self, rnd: int, model: nn.Module, global_state: State, dataset, seed: int) -> State:
        """The target's bank: (N, 4C) pooled latents of the global model on its first --mrcm_bank
        training slices, masks drawn from `seed`."""
        model.load_state_dict(global_state)
        dataset.set_epoch(seed)
        device = next(model.parameters()).device
        return {"bank": pooled_latents(self.task, model, dataset, device, self.opts.mrcm_bank, self.opts.local_bs)}

    def round_payload(self, rnd: int, contexts: dict[str, State]) -> State:
        # Features mode has one context site, the target; its bank goes to every source client.
        return {"bank": context["bank"] for context in contexts.values()}

    def load_round_payload(self, payload: State) -> None:
        if "bank" in payload:
            self.bank = payload["bank"].to(self.device)

    def begin_round(self, rnd: int, model: nn.Module, global_state: State, clients: list[Client]) -> None:
        for client in clients:
            if self.is_source(client) and self.opts.mrcm_target == "images":
                client.extra["target_batches"] = self._target_batches(client.extra["target_generator"])

    def _target_batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        """Endless model inputs of undersampled target images, reshuffled with fresh masks every pass."""
        loader = make_loader(self.target_images, self.opts.local_bs, True, generator,
                             self.opts.num_workers, self.device)
        while True:
            self.target_images.set_epoch(int(torch.randint(2**31 - 1, (1,), generator=generator)))
            for batch in loader:
                yield self.task.to_device(batch, self.device).inputs

    def training_loss(self, client, model, batch):
        if not self.is_source(client):
            return super().training_loss(client, model, batch)
        output, latent = self.task.forward_with_latent(model, batch.inputs)
        recon = self.task.loss(output, batch)
        source = pool_latent(latent)
        if self.opts.mrcm_target == "images":
            # Target images need only the encoder: the decoder never runs on them.
            # Under torchrun each process encodes its share of the target batch, as of the source batch.
            target = distributed.current().my_share(next(client.extra["target_batches"]))
            target_latent = pool_latent(self.task.encode(model, target))
        else:
            idx = torch.randint(len(self.bank), (len(source),), generator=client.extra["target_generator"])
            target_latent = self.bank[idx.to(self.bank.device)]
        labels = torch.cat([torch.full((len(source),), SOURCE), torch.full((len(target_latent),), TARGET)])
        labels = labels.to(source.device)

        disc, disc_opt = client.extra["disc"], client.extra["disc_opt"]
        disc.requires_grad_(True)
        logits = disc(torch.cat([source.detach(), target_latent.detach()]))
        disc_loss = F.cross_entropy(logits, labels)
        disc_opt.zero_grad(set_to_none=True)
        disc_loss.backward()
        # Under torchrun every process holds the same discriminator: its gradients are summed over
        # the processes' shares of the batch like the U-Net's.
        group = distributed.current()
        group.average_gradients(list(disc.parameters()), group.share)
        disc_opt.step()

        # The U-Net's turn: both sites' latents should be classified as the other site. The
        # discriminator is frozen so this backward pass reaches only the U-Net.
        disc.requires_grad_(False)
        adv = F.cross_entropy(disc(torch.cat([source, target_latent])), 1 - labels)
        loss = recon + self.opts.lambda_adv * adv
        logs = {"recon_loss": recon.detach(), "adv_loss": adv.detach(), "disc_loss": disc_loss.detach(),
                "disc_acc": (logits.argmax(1) == labels).float().mean()}
        return loss, logs


def _seed(seed: int, name: str) -> int:
    return seed * 1_000_003 + zlib.crc32(name.encode())
