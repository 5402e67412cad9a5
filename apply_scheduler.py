"""Weight a new fine-tuning dataset with a trained scheduler checkpoint (see conf/apply.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from scheduler.apply import apply_scheduler
from scheduler.data.io import DataError


@hydra.main(config_path="conf", config_name="apply", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        summary = apply_scheduler(cfg.checkpoint, cfg.input, cfg.output, cfg.chunk, cfg.histogram)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary)


if __name__ == "__main__":
    main()
