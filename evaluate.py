"""Evaluate a policy on LIBERO: ``python evaluate.py ckpt=best trials=50`` (see conf/eval.yaml, rsd/evaluate.py)."""

from rsd.evaluate import main

if __name__ == "__main__":
    main()
