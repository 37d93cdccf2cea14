"""Placeholder: being written."""
RWKV4TimeMix = RWKV4ChannelMix = RWKV4Block = None
