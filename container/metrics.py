"""The training job's metric lines as SageMaker reads them: the MetricDefinitions `launch train` passes to
CreateTrainingJob, matching the lines train/metrics.py prints (one per logging step), e.g.

    stage=sft step=10 train_loss=1.234 learning_rate=0.0002 grad_norm=0.5 tokens_per_second=812.3 epoch=0.5

Here, in the contract shared by both sides, because `launch` (on the workstation) must not import `train`.
"""

from __future__ import annotations

_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": rf"stage=\S+ step=\d+ train_loss={_NUMBER}"},
    {"Name": "eval:loss", "Regex": rf"eval_loss={_NUMBER}"},
    {"Name": "train:learning_rate", "Regex": rf" learning_rate={_NUMBER}"},
    {"Name": "train:grad_norm", "Regex": rf" grad_norm={_NUMBER}"},
    {"Name": "train:tokens_per_second", "Regex": rf" tokens_per_second={_NUMBER}"},
    {"Name": "train:epoch", "Regex": rf" epoch={_NUMBER}"},
    {"Name": "dpo:rewards_accuracies", "Regex": rf" rewards_accuracies={_NUMBER}"},
    {"Name": "dpo:rewards_margins", "Regex": rf" rewards_margins={_NUMBER}"},
    {"Name": "grpo:reward", "Regex": rf" reward={_NUMBER}"},
    {"Name": "grpo:style", "Regex": rf" rewards_style_mean={_NUMBER}"},
    {"Name": "voice:length_ratio", "Regex": rf" voice_length_ratio={_NUMBER}"},
    {"Name": "voice:distinct2", "Regex": rf" voice_distinct2={_NUMBER}"},
    {"Name": "voice:style_distance", "Regex": rf" voice_style_distance={_NUMBER}"},
    {"Name": "voice:overlap", "Regex": rf" voice_overlap={_NUMBER}"},
    {"Name": "eval:perplexity", "Regex": rf" perplexity={_NUMBER}"},
]
