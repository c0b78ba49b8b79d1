"""MoAI inside other tools: :mod:`moai_sdk.integrations.lmms_eval` (the ``lmms-eval`` model plugin)."""
