import os

# No test may reach the Hugging Face hub: without this a hub name takes minutes to fail offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
