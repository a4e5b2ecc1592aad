"""The chat room of a course: every WebSocket of the room joins the group ``chat_<course_id>``.

Each text frame the browser sends (``{"message": "..."}``) is broadcast with the sender's name
and the server's timestamp to every socket in the room, on any server process that shares the
channel layer (here the channelbus broker).
"""

import json
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.utils import timezone

MAX_NAME = 40
MAX_MESSAGE = 2000


class ChatConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.course_id = self.scope["url_route"]["kwargs"]["course_id"]
        self.room_group_name = f"chat_{self.course_id}"
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        self.user_name = (query.get("name", [""])[0].strip()[:MAX_NAME]) or "anonymous"
        await self.channel_layer.group_add(self.room_group_name, self.channel_name)
        await self.accept()

    async def disconnect(self, close_code):
        await self.channel_layer.group_discard(self.room_group_name, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        try:
            message = str(json.loads(text_data or "{}").get("message", "")).strip()
        except (ValueError, AttributeError):
            return  # not a JSON object: nothing to say
        if not message:
            return
        await self.channel_layer.group_send(self.room_group_name, {
            "type": "chat.message",
            "message": message[:MAX_MESSAGE],
            "user": self.user_name,
            "datetime": timezone.now().isoformat(),
        })

    async def chat_message(self, event):
        """A message of the room (from this process or another): pass it to the browser."""
        await self.send(text_data=json.dumps({
            "message": event["message"], "user": event["user"], "datetime": event["datetime"],
        }))
