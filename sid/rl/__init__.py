"""The RL stage (GRPO after SFT, MiniOneRec's recipe): rewards, group advantages and the policy-gradient losses.

Rollouts come from `sid.eval.beam` (group = beams) or `sid.eval.sampling` (group = temperature samples); see
docs/rl.md for the recipe and what is still to be built on top of these pieces."""
