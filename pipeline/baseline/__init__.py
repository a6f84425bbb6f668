"""The supervised-pretraining baseline (Zoph et al. 2020): pretrain on a labelled source set
(pretrain.py), fine-tune on the labelled target set (finetune.py)."""
