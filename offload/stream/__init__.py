"""Streaming decoder layers through the device: the block streamer, zeroth-order streaming, and the bitsandbytes
pieces that make 4-bit layers streamable."""
