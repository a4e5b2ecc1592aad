"""The channelbus broker: protocol (pure), routing state (pure) and the ZeroMQ server."""
