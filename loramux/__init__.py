"""loramux: many tenants' LoRA adapters served from one quantized base LLM.

The distribution maps the top-level folders to import names: ``inference/`` is
``loramux.inference``, ``operator/`` is ``loramux.operator`` and ``training/`` is
``loramux.training``. This package itself holds only the small, torch-free contracts that
every part shares (names and adapter references).
"""

__version__ = "0.1.0"
