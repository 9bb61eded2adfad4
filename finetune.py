"""Fine-tune a LoRA adapter: `python finetune.py --data_path data.json` (or `cog exec python finetune.py`).

Multi-GPU: `torchrun --nproc_per_node=N finetune.py ...`. `python finetune.py --help` lists every flag.
"""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
