"""Harness integrations (optional extras; installed as ``tokenprune.integrations``, ``integrations`` in a
checkout): a pruned LLaVA / LLaVA-NeXT as an lmms-eval model
(:mod:`integrations.lmms_eval_model`, entry point ``lmms_eval.models: tokenprune``) and as an lm-eval
model (:mod:`integrations.lm_eval_model`, registered as ``tokenprune``). Both wrap :class:`PrunedVLM`."""
