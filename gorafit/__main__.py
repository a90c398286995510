"""``python -m gorafit`` (and ``torchrun -m gorafit run ...`` for several processes)."""

from gorafit.cli import main

if __name__ == "__main__":
    main()
