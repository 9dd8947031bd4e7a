"""Training: the optimizer, the train state and the pretrain / SFT / DPO steps."""
