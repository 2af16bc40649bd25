"""fastws benchmark harness: fastws against nginx, HAProxy and no proxy at all.

Run it from the repository root with ``python -m bench`` (see bench/README.md).
"""
