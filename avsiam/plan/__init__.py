"""Capacity planning: memory per GPU, fit, FLOPs and GPU-hours of a recipe on a cluster
(``planner``, ``memory``, ``compute``, ``hardware``), and the DeepSpeed configs of the paper's
runs generated from it (``cluster_configs``, written to ``deepspeed_configs/``)."""
