"""LoRA fine-tuning of GLM4-MoE.

  adapters.py  target selection, the adapter table, `attach` (adapters as the model's low-rank deltas,
               jaxmoe/model/deltas.py), the routed experts' grouped deltas, merge_lora
  train.py     partial training: adapters (+ modules_to_save / regex-chosen params) over a frozen base
  merge.py     `merge-lora`: base + saved adapters -> full HF / mcore checkpoint
PEFT export lives in jaxmoe/convert/peft_export.py.
"""
from jaxmoe.lora.adapters import *  # noqa: F401,F403
from jaxmoe.lora.adapters import (LoraConfig, attach, init_lora, lora_experts_fc1, lora_experts_fc2,  # noqa: F401
                                  lora_specs, merge_lora)
