import os

# Two shared cores: one intra-op thread per test process keeps timings sane (on a shared 2-core machine PyTorch's default OpenMP threads stall each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
