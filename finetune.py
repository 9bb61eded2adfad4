"""Fine-tune a LoRA adapter: `python finetune.py --data_path data.json` (or `cog exec python finetune.py`).

Multi-GPU: `torchrun --nproc_per_node=N finetune.py ...`. `python finetune.py --help` lists every flag.
"""

import sys

if __name__ == "__main__":
    from finetune.training.allocator import restart_with_jemalloc

    restart_with_jemalloc()  # glibc's malloc fragments under training's changing tensor sizes

    from finetune.training.cli import main

    sys.exit(main())
