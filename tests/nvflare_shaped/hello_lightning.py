"""The shape of NVIDIA FLARE's PyTorch Lightning client script (``patch(trainer)``, then
``validate`` and ``fit`` each round), ported by changing its import line only
(``nvflare.client.lightning`` -> ``flare_async.client.lightning``)."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

import flare_async.client.lightning as flare
from tests.nvflare_shaped.net import SimpleNetwork, site_data


class LitNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = SimpleNetwork()
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (torch.argmax(self(x), 1) == y).float().mean()
        self.log("val_acc_epoch", acc, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class DigitsDataModule(L.LightningDataModule):
    def __init__(self, config, batch_size=32):
        super().__init__()
        self.config, self.batch_size = config, batch_size

    def setup(self, stage):
        self.train, self.test = site_data(self.config, self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self.train

    def val_dataloader(self) -> DataLoader:
        return self.test


def main():
    model = LitNet()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    # (2) patch the lightning trainer
    flare.patch(trainer)
    dm = DigitsDataModule(flare.get_config())

    while flare.is_running():
        # (3) receives FLModel from NVFlare
        input_model = flare.receive()
        print(f"\n[Current Round={input_model.current_round}, Site = {flare.get_site_name()}]\n")

        # (4) evaluate the current global model to allow server-side model selection
        print("--- validate global model ---")
        trainer.validate(model, datamodule=dm)

        # (5) perform local training starting with global model
        print("--- train new model ---")
        trainer.fit(model, datamodule=dm)


if __name__ == "__main__":
    main()
