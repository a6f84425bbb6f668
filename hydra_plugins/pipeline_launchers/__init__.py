"""The pipeline's Hydra launchers. Hydra takes plugins only from the `hydra_plugins` namespace
package; the code lives in pipeline/runtime/slurm.py."""
