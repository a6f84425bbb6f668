"""The Lightning machinery every stage uses: the LightningModule (module.py), the DataModule and
its rank-aware samplers (datamodule.py), the Trainer built from the `trainer` config
(trainer.py), and the calls that train, test and predict with them (fit.py, predict.py)."""
