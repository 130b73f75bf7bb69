"""ml_collections config files: `python launch.py --config=configs/<name>.py[:arg]`."""
