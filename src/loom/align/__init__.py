"""Online post-training: the policy samples, rewards score the samples, the trainer updates the
policy (GRPO). Rollouts run on the serving engine over the policy's own weights."""
