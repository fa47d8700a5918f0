"""PLACEHOLDER: being written in this session."""
NAME = "onednn"


def unavailable_reason(device_type, dtype):
    return "not implemented yet"
