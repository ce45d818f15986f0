"""The held-out evaluation suite (MMLU, BBH, GSM8K, SVAMP, ASDiv, StrategyQA,
TyDiQA GoldP, MGSM) as seqio tasks and mixtures; see suite.py."""
