"""The RL stage (GRPO after SFT, MiniOneRec's recipe): rewards, group advantages, the policy-gradient losses, the
rollout batch source and `python -m sid.rl`.

Rollouts come from `sid.eval.beam` (group = beams) or `sid.eval.sampling` (group = temperature samples); docs/rl.md
gives the recipe and what sid does differently."""
