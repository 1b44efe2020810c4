"""fedtune: federated fine-tuning of language models (FedAvg-LoRA, FedProx, FLoRA, Fed-SB, FedKSeed)."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# Two notices from dependencies in every process's log that no user can act on (only these messages are dropped):
# - peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` alias on every PeftModel (FutureWarning);
# - bitsandbytes (imported by peft) on AVX512-BF16 CPUs suggests `pip install kernels`, a package that fetches its
#   kernel from the Hugging Face Hub at run time, which fedtune never does; bitsandbytes' own CPU kernel is used.
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
