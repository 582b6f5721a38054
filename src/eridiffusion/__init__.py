"""EriDiffusion: fine-tune diffusion models from one ai-toolkit-style YAML file."""
__version__ = "0.1.0"

import logging as _logging

# torchao reports each optional C++ kernel built for another torch version (mxfp8, cutlass) as a warning at
# import; the quantized storages used here do not need them
_logging.getLogger("torchao").setLevel(_logging.ERROR)
