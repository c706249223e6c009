"""Latency runners (one interface, one backend per runtime) and model cost counting."""
