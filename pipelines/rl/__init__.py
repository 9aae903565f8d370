"""Flow-GRPO on Ray: rollout workers, a reward actor pool, a DeepSpeed learner (see ``loop.run_grpo``)."""
