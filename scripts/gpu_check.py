"""`make gpu-check`: every GPU measurement in one command (see visiondrop/efficiency/gpu_check.py)."""
import sys

from visiondrop.efficiency.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
