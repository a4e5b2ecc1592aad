"""Consumers (dispatch by message type), their runner and the channelbus CLI."""
