"""Training tenants' LoRA adapters over one frozen (optionally NF4-quantized) base.

``loramux train`` (``cli_train.main``) reads a config (``config``), tokenizes each task's
data (``data``), samples tasks by temperature (``sampling``) and trains one adapter per
task in a single PeftModel (``trainer``), exporting version directories the server loads.
Nothing is imported here, so ``import loramux.training`` stays torch-free.
"""
