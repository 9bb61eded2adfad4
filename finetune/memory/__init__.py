"""Will training or serving fit on this GPU, and with which settings: the byte counts of a model's shape
(footprint), the plans built from them (plan) and `python -m finetune plan` (cli)."""
