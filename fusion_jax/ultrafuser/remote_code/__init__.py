"""PyTorch code saved beside every fused export (``export.save_fused``) so that transformers loads it with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. These files import only torch and
transformers (they run without fusion-jax installed); fusion-jax never imports them itself."""
from pathlib import Path

FILES = ("configuration_ultrafuser.py", "modeling_ultrafuser.py")
DIR = Path(__file__).resolve().parent
