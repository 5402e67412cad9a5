"""Train the amortised Bayesian Data Scheduler (see conf/train.yaml), then score the demo set."""

import hydra
from omegaconf import DictConfig

from scheduler.apply import apply_scheduler
from scheduler.data.io import exit_on_data_error
from scheduler.data.mixing import resolve_path
from scheduler.training import CONFIG_DIR, PROJECT_ROOT, register_resolvers, run_dir, train

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on_data_error():
        checkpoint = train(cfg)
        print(f"checkpoint: {checkpoint}")
        if cfg.get("demo_input"):
            demo = resolve_path(cfg.demo_input, PROJECT_ROOT)
            print(apply_scheduler(checkpoint, demo, run_dir(cfg) / f"{demo.stem}.scored.jsonl"))


if __name__ == "__main__":
    main()
