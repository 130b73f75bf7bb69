"""Data: records (JSONL), images, prompts."""
