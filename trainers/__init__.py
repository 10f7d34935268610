"""Models, objectives, samplers, the DeepSpeed engine and the training loops (the middle layer)."""

import logging

# diffusers imports peft, which imports bitsandbytes whenever it is installed (the finetune extra), and
# bitsandbytes then warns at import time, on CPUs with AVX512-BF16, that an optional prebuilt CPU kernel
# from the hub is unavailable; its own fallback kernel is used. No user action helps (nuance never
# downloads kernels), so the warning would only clutter every run's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
