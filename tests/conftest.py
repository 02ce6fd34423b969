import os
import sys

# Pure-logic tests never need a GPU; keep torch from probing for one.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(__file__))
