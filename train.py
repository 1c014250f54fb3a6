"""Train any rsd model: ``python train.py experiment=draft_proj`` (see conf/experiment/ and rsd/train.py)."""

from rsd.train import main

if __name__ == "__main__":
    main()
