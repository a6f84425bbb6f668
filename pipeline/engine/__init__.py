"""The Lightning machinery every stage uses: the LightningModule (module.py, its losses in
losses.py), the DataModule (datamodule.py) with its datasets and rank-aware samplers
(batches.py), the Trainer built from the `trainer` config (trainer.py), and the calls that
train, test and predict with them (fit.py, predict.py)."""
