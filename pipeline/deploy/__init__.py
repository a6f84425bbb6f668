"""Using a trained model: what a checkpoint says about itself and the network it rebuilds
(`model.py`, `load_model`), predicting a folder or tar shards of new images into a table
(`predict.py`, `table.py`: stage=predict) and exporting to ONNX or TorchScript (`export.py`:
stage=export)."""
