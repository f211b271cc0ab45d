"""Put on PYTHONPATH by scripts/probe_gap.py for the engine processes it
starts (and, through the environment, their core process): logs prefill
passes and inserts to $PROBE_LOG."""
import os
import sys

if os.environ.get("PROBE_LOG"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import probe_hooks

    probe_hooks.install(os.environ["PROBE_LOG"])
