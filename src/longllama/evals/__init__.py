"""Evaluation tasks, one module per task (`passkey`: pass key retrieval from long filler text)."""
