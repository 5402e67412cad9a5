"""Weight a new fine-tuning dataset with a trained scheduler checkpoint (see conf/apply.yaml)."""

import hydra
from omegaconf import DictConfig

from scheduler.apply import apply_scheduler
from scheduler.data.io import exit_on_data_error


@hydra.main(config_path="conf", config_name="apply", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on_data_error():
        summary = apply_scheduler(cfg.checkpoint, cfg.input, cfg.output, cfg.chunk, cfg.histogram,
                                  scoring_shift=cfg.scoring_shift, scoring_shift_taper=cfg.scoring_shift_taper,
                                  group_by=cfg.group_by, withhold_below=cfg.withhold_below,
                                  withhold_block=cfg.withhold_block, withhold_spares_refusals=cfg.withhold_spares_refusals,
                                  show_lowest=cfg.show_lowest, calibrate_on=cfg.calibrate_on,
                                  flag_rate=cfg.flag_rate, flag_below=cfg.flag_below,
                                  score_unreadable=cfg.score_unreadable, score_by_exchange=cfg.score_by_exchange,
                                  exchange_margin=cfg.exchange_margin, exchange_margin_cap=cfg.exchange_margin_cap,
                                  short_answer_words=cfg.short_answer_words)
    print(summary)


if __name__ == "__main__":
    main()
