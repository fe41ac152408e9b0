import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Two torch threads on two shared cores were measured 6x slower under outside load than one.
torch.set_num_threads(int(os.environ.get("DIRL_TEST_THREADS", "1")))
